package attest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"net/url"
	"testing"

	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/google/go-tpm/tpm2"
)

// Issue 11, TPM enrollment: adversarial tests of the verifier with crafted
// evidence. The swtpm tests (swtpm_test.go) cover the same checks with
// evidence from a real TPM.

// TestEKCertificateProfile: only a certificate that is an EK certificate by
// the TCG EK Credential Profile is accepted as one, however it chains.
func TestEKCertificateProfile(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	dnsSAN := func(c *x509.Certificate) {
		// A critical SAN with the TCG directoryName and a DNS name: Go
		// handles it once it parsed the DNS name.
		v, err := asn1.Marshal([]asn1.RawValue{
			{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: mustRDNs(t)},
			{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("tpm.example.com")},
		})
		if err != nil {
			t.Fatal(err)
		}
		c.ExtraExtensions[0].Value = v
	}
	tests := []struct {
		name string
		der  []byte
		want []error
	}{
		{name: "An ECC EK certificate with keyAgreement is accepted", der: pki.ekCert(t, &ecKey.PublicKey, nil)},
		{name: "An RSA EK certificate with keyEncipherment is accepted", der: pki.ekCert(t, &rsaKey.PublicKey, nil)},
		{name: "An EK certificate without extended key usage is accepted", der: pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.UnknownExtKeyUsage = nil })},
		{
			name: "A signing-only leaf without EKU or SAN from the manufacturer is refused",
			der: pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) {
				c.KeyUsage = x509.KeyUsageDigitalSignature
				c.UnknownExtKeyUsage = nil
				c.ExtraExtensions = nil
			}),
			want: []error{attest.ErrEKKeyUsage, attest.ErrEKChainInvalid},
		},
		{
			name: "A signing-only leaf with the TCG SAN and EKU is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageDigitalSignature }),
			want: []error{attest.ErrEKKeyUsage},
		},
		{
			name: "An ECC EK certificate that also allows signing is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage |= x509.KeyUsageDigitalSignature }),
			want: []error{attest.ErrEKKeyUsage},
		},
		{
			name: "An RSA EK certificate with keyAgreement instead of keyEncipherment is refused",
			der:  pki.ekCert(t, &rsaKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyAgreement }),
			want: []error{attest.ErrEKKeyUsage},
		},
		{
			name: "An ECC EK certificate with keyEncipherment instead of keyAgreement is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }),
			want: []error{attest.ErrEKKeyUsage},
		},
		{
			name: "An EK certificate without key usage is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.KeyUsage = 0 }),
			want: []error{attest.ErrEKKeyUsage},
		},
		{
			name: "An EK certificate whose EKU adds clientAuth to tcg-kp-EKCertificate is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} }),
			want: []error{attest.ErrEKEKU},
		},
		{
			name: "A critical SAN with the TCG directoryName and a DNS name is refused",
			der:  pki.ekCert(t, &ecKey.PublicKey, dnsSAN),
			want: []error{attest.ErrEKSAN},
		},
		{
			name: "A critical SAN with only a URI is refused",
			der: pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) {
				c.ExtraExtensions = nil
				u, _ := url.Parse("urn:tpm:1")
				c.URIs = []*url.URL{u}
			}),
			want: []error{attest.ErrEKSAN},
		},
		{
			name: "A non-critical SAN with the TCG directoryName and an email address is refused",
			der: pki.ekCert(t, &ecKey.PublicKey, func(c *x509.Certificate) {
				dnsSAN(c)
				c.ExtraExtensions[0].Critical = false
			}),
			want: []error{attest.ErrEKSAN},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for _, verify := range []struct {
				name string
				f    func() error
			}{
				{"VerifyEKCertificate", func() error {
					_, err := attest.VerifyEKCertificate(tc.der, pki.roots, testNow)
					return err
				}},
				{"ParseEKCertificate (allowlist without roots)", func() error {
					_, _, err := attest.ParseEKCertificate(tc.der)
					return err
				}},
			} {
				err := verify.f()
				if len(tc.want) == 0 && err != nil {
					t.Errorf("%s: %v", verify.name, err)
				}
				for _, w := range tc.want {
					if !errors.Is(err, w) {
						t.Errorf("%s: err = %v, want %v", verify.name, err, w)
					}
				}
			}
		})
	}
}

func mustRDNs(t testing.TB) []byte {
	t.Helper()
	var rdns pkix.RDNSequence
	for _, a := range stdTPMAttrs() {
		rdns = append(rdns, pkix.RelativeDistinguishedNameSET{a})
	}
	b, err := asn1.Marshal(rdns)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEKCertificateMalformed: an EK certificate that does not parse has its
// own error, not the attestation's.
func TestEKCertificateMalformed(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	for _, der := range [][]byte{nil, []byte("garbage"), make([]byte, attest.MaxEKCertSize+1)} {
		if _, err := attest.VerifyEKCertificate(der, pki.roots, testNow); !errors.Is(err, attest.ErrEKCertMalformed) {
			t.Errorf("VerifyEKCertificate(%d bytes): err = %v, want ErrEKCertMalformed", len(der), err)
		}
		if _, _, err := attest.ParseEKCertificate(der); !errors.Is(err, attest.ErrEKCertMalformed) {
			t.Errorf("ParseEKCertificate(%d bytes): err = %v, want ErrEKCertMalformed", len(der), err)
		}
	}
}

// reencodeSig rewrites an ECDSA TPMT_SIGNATURE with R and S as given by f.
func reencodeSig(t testing.TB, sigBytes []byte, f func(r, s []byte) ([]byte, []byte)) []byte {
	t.Helper()
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](sigBytes)
	if err != nil {
		t.Fatal(err)
	}
	ecc, err := sig.Signature.ECDSA()
	if err != nil {
		t.Fatal(err)
	}
	r, s := f(ecc.SignatureR.Buffer, ecc.SignatureS.Buffer)
	return tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash: ecc.Hash, SignatureR: tpm2.TPM2BECCParameter{Buffer: r}, SignatureS: tpm2.TPM2BECCParameter{Buffer: s},
		}),
	})
}

func padZero(b []byte) []byte { return append([]byte{0}, b...) }

// TestCertifyIssue11: signature encodings, TLS key scheme and policy, and
// the qualified name.
func TestCertifyIssue11(t *testing.T) {
	t.Parallel()
	e := newSWEvidence(t)
	mutated := func(f func(e *swEvidence)) *swEvidence {
		c := *e
		f(&c)
		return &c
	}
	tlsWith := func(f func(p *tpm2.TPMTPublic)) *swEvidence {
		return mutated(func(c *swEvidence) {
			p := clonePub(t, c.tlsPub)
			f(&p)
			c.tlsPub, c.tlsPub2B = p, public2B(p)
			c.certify(t, tpm2.TPMSTAttestCertify, c.nonce, mustName(t, &p))
		})
	}
	withQN := func(qn func(name []byte) []byte) *swEvidence {
		return mutated(func(c *swEvidence) {
			name := mustName(t, &c.tlsPub)
			att := tpm2.TPMSAttest{
				Magic: tpm2.TPMGeneratedValue, Type: tpm2.TPMSTAttestCertify,
				QualifiedSigner: tpm2.TPM2BName{Buffer: mustName(t, &c.akPub)},
				ExtraData:       tpm2.TPM2BData{Buffer: c.nonce},
				Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{
					Name: tpm2.TPM2BName{Buffer: name}, QualifiedName: tpm2.TPM2BName{Buffer: qn(name)},
				}),
			}
			raw := tpm2.Marshal(att)
			c.attest2B = tpm2.Marshal(tpm2.TPM2BAttest(tpm2.BytesAs2B[tpm2.TPMSAttest](raw)))
			c.signature = signECDSA(t, c.akKey, raw)
		})
	}
	hierarchyQN := func(h tpm2.TPMHandle) func([]byte) []byte {
		return func(name []byte) []byte {
			hh := sha256.New()
			_ = binary.Write(hh, binary.BigEndian, uint32(h))
			hh.Write(name)
			return hh.Sum([]byte{0, 0x0b})
		}
	}
	scheme := func(alg tpm2.TPMAlgID, hash tpm2.TPMAlgID) func(p *tpm2.TPMTPublic) {
		return func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.ECCDetail()
			d.Scheme = tpm2.TPMTECCScheme{Scheme: alg}
			if alg == tpm2.TPMAlgECDSA {
				d.Scheme.Details = tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: hash})
			}
			if alg == tpm2.TPMAlgECDAA {
				d.Scheme.Details = tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDAA, &tpm2.TPMSSchemeECDAA{HashAlg: hash})
			}
		}
	}
	tests := []struct {
		name string
		ev   *swEvidence
		want error
	}{
		{name: "The reference evidence passes", ev: e},
		{name: "A TLS key with scheme ECDSA-SHA256 passes", ev: tlsWith(scheme(tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA256))},
		{name: "A TLS key with scheme NULL passes", ev: tlsWith(scheme(tpm2.TPMAlgNull, 0))},
		{name: "A signature whose R has a leading zero byte is refused", ev: mutated(func(c *swEvidence) {
			c.signature = reencodeSig(t, c.signature, func(r, s []byte) ([]byte, []byte) { return padZero(r), s })
		}), want: attest.ErrCertifySignature},
		{name: "A signature whose S has a leading zero byte is refused", ev: mutated(func(c *swEvidence) {
			c.signature = reencodeSig(t, c.signature, func(r, s []byte) ([]byte, []byte) { return r, padZero(s) })
		}), want: attest.ErrCertifySignature},
		{name: "A signature with an R shorter than the curve size is refused", ev: mutated(func(c *swEvidence) {
			// Re-sign until R has a leading zero byte, then drop it.
			for {
				c.certify(t, tpm2.TPMSTAttestCertify, c.nonce, mustName(t, &c.tlsPub))
				var short bool
				c.signature = reencodeSig(t, c.signature, func(r, s []byte) ([]byte, []byte) {
					if r[0] == 0 {
						short = true
						return r[1:], s
					}
					return r, s
				})
				if short {
					return
				}
			}
		}), want: attest.ErrCertifySignature},
		{name: "A TLS key with scheme ECDSA-SHA384 is refused", ev: tlsWith(scheme(tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA384)), want: attest.ErrKeyType},
		{name: "A TLS key with scheme ECDSA-SHA1 is refused", ev: tlsWith(scheme(tpm2.TPMAlgECDSA, tpm2.TPMAlgSHA1)), want: attest.ErrKeyType},
		{name: "A TLS key with scheme ECDAA is refused", ev: tlsWith(scheme(tpm2.TPMAlgECDAA, tpm2.TPMAlgSHA256)), want: attest.ErrKeyType},
		{name: "A TLS key with a KDF is refused", ev: tlsWith(func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.ECCDetail()
			d.KDF = tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgKDF1SP80056A, Details: tpm2.NewTPMUKDFScheme(tpm2.TPMAlgKDF1SP80056A, &tpm2.TPMSKDFSchemeKDF1SP80056A{HashAlg: tpm2.TPMAlgSHA256})}
		}), want: attest.ErrKeyType},
		{name: "A TLS key with an authPolicy is refused", ev: tlsWith(func(p *tpm2.TPMTPublic) {
			p.AuthPolicy = tpm2.TPM2BDigest{Buffer: bytes.Repeat([]byte{0x5a}, 32)}
		}), want: attest.ErrKeyPolicy},
		{name: "A TLS key with adminWithPolicy is refused", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.AdminWithPolicy = true }), want: attest.ErrKeyPolicy},
		{name: "A TLS key without userWithAuth is refused", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.UserWithAuth = false }), want: attest.ErrKeyPolicy},
		{name: "A qualified name equal to the name is refused", ev: withQN(func(n []byte) []byte { return n }), want: attest.ErrCertifyQualifiedName},
		{name: "A qualified name of a NULL-hierarchy (external) key is refused", ev: withQN(hierarchyQN(tpm2.TPMRHNull)), want: attest.ErrCertifyQualifiedName},
		{name: "A qualified name of an owner-hierarchy primary key is refused", ev: withQN(hierarchyQN(tpm2.TPMRHOwner)), want: attest.ErrCertifyQualifiedName},
		{name: "A qualified name of an endorsement-hierarchy primary key is refused", ev: withQN(hierarchyQN(tpm2.TPMRHEndorsement)), want: attest.ErrCertifyQualifiedName},
		{name: "A qualified name of another size is refused", ev: withQN(func(n []byte) []byte { return append([]byte{0, 0x0b}, make([]byte, 20)...) }), want: attest.ErrCertifyQualifiedName},
		{name: "A qualified name with another hash algorithm is refused", ev: withQN(func(n []byte) []byte { return append([]byte{0, 0x0c}, make([]byte, 48)...) }), want: attest.ErrCertifyQualifiedName},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := attest.VerifyCertify(&tc.ev.akPub, tc.ev.tlsPub2B, tc.ev.attest2B, tc.ev.signature, tc.ev.nonce, &tc.ev.tlsKey.PublicKey)
			t.Logf("VerifyCertify: %v", err)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("VerifyCertify: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestAKIssue11: the AK's scheme must match its curve, and it must be
// authorized by its authValue only.
func TestAKIssue11(t *testing.T) {
	t.Parallel()
	e := newSWEvidence(t)
	with := func(f func(p *tpm2.TPMTPublic)) []byte {
		p := clonePub(t, e.akPub)
		f(&p)
		return public2B(p)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	ak384 := func(hash tpm2.TPMAlgID) []byte {
		p := eccPublic(clonePub(t, e.akPub), &p384.PublicKey)
		d, _ := p.Parameters.ECCDetail()
		d.CurveID = tpm2.TPMECCNistP384
		d.Scheme = tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: hash})}
		return public2B(p)
	}
	tests := []struct {
		name string
		pub  []byte
		want error
	}{
		{name: "A P-256 ECDSA-SHA256 AK is accepted", pub: e.akPub2B},
		{name: "A P-384 ECDSA-SHA384 AK is accepted", pub: ak384(tpm2.TPMAlgSHA384)},
		{name: "A P-256 AK signing with SHA-384 is refused", pub: with(func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.ECCDetail()
			d.Scheme = tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA384})}
		}), want: attest.ErrKeyType},
		{name: "A P-384 AK signing with SHA-256 is refused", pub: ak384(tpm2.TPMAlgSHA256), want: attest.ErrKeyType},
		{name: "An AK with a KDF is refused", pub: with(func(p *tpm2.TPMTPublic) {
			d, _ := p.Parameters.ECCDetail()
			d.KDF = tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgKDF1SP80056A, Details: tpm2.NewTPMUKDFScheme(tpm2.TPMAlgKDF1SP80056A, &tpm2.TPMSKDFSchemeKDF1SP80056A{HashAlg: tpm2.TPMAlgSHA256})}
		}), want: attest.ErrKeyType},
		{name: "An AK with an authPolicy is refused", pub: with(func(p *tpm2.TPMTPublic) {
			p.AuthPolicy = tpm2.TPM2BDigest{Buffer: bytes.Repeat([]byte{0xa5}, 32)}
		}), want: attest.ErrAKPolicy},
		{name: "An AK with adminWithPolicy is refused", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.AdminWithPolicy = true }), want: attest.ErrAKPolicy},
		{name: "An AK without userWithAuth is refused", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.UserWithAuth = false }), want: attest.ErrAKPolicy},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := attest.VerifyAK(tc.pub)
			t.Logf("VerifyAK: %v", err)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("VerifyAK: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

// clonePub is a deep copy of a public area: go-tpm's unions hold pointers.
func clonePub(t testing.TB, p tpm2.TPMTPublic) tpm2.TPMTPublic {
	t.Helper()
	c, err := tpm2.Unmarshal[tpm2.TPMTPublic](tpm2.Marshal(p))
	if err != nil {
		t.Fatal(err)
	}
	return *c
}
