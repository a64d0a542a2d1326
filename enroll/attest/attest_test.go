package attest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/google/go-tpm/tpm2"
)

func TestVerifyEKCertificate(t *testing.T) {
	t.Parallel()
	pki := newSWPKI(t)
	other := newSWPKI(t)
	ekKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384Key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p224Key, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	good := pki.ekCert(t, &ekKey.PublicKey, nil)

	tests := []struct {
		name  string
		der   []byte
		roots *x509.CertPool
		now   time.Time
		want  error
	}{
		{name: "An EK certificate from the manufacturer verifies", der: good, roots: pki.roots, now: testNow},
		{name: "A P-384 EK certificate verifies", der: pki.ekCert(t, &p384Key.PublicKey, nil), roots: pki.roots, now: testNow},
		{name: "An EK certificate without subjectAltName is refused", der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) { c.ExtraExtensions = nil }), roots: pki.roots, now: testNow, want: attest.ErrEKSAN},
		{name: "An EK certificate from an unknown manufacturer is refused", der: other.ekCert(t, &ekKey.PublicKey, nil), roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid},
		{name: "No configured roots is refused rather than falling back to system roots", der: good, roots: nil, now: testNow, want: attest.ErrEKChainInvalid},
		{name: "An expired EK certificate is refused", der: good, roots: pki.roots, now: testNow.Add(2 * time.Hour), want: attest.ErrEKChainInvalid},
		{name: "An EK certificate that is not yet valid is refused", der: good, roots: pki.roots, now: testNow.Add(-2 * time.Hour), want: attest.ErrEKChainInvalid},
		{
			name: "A critical subjectAltName without the TPM model is refused",
			der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.ExtraExtensions[0].Value = tcgSAN(t, stdTPMAttrs()[0], stdTPMAttrs()[2])
			}),
			roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid,
		},
		{
			name: "A critical subjectAltName with a non-TCG attribute is refused",
			der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.ExtraExtensions[0].Value = tcgSAN(t, append(stdTPMAttrs(), pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 5, 4, 3}, Value: "x"})...)
			}),
			roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid,
		},
		{
			name: "Another unhandled critical extension is still refused",
			der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.ExtraExtensions = append(c.ExtraExtensions, pkix.Extension{Id: asn1.ObjectIdentifier{1, 2, 3, 4}, Critical: true, Value: []byte{5, 0}})
			}),
			roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid,
		},
		{
			name: "A certificate with a TLS extended key usage instead of the TCG one is refused",
			der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.UnknownExtKeyUsage = nil
				c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			}),
			roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid,
		},
		{
			name: "A CA certificate is refused as EK certificate",
			der: pki.ekCert(t, &ekKey.PublicKey, func(c *x509.Certificate) {
				c.IsCA = true
				c.KeyUsage |= x509.KeyUsageCertSign
			}),
			roots: pki.roots, now: testNow, want: attest.ErrEKChainInvalid,
		},
		{name: "An EK on an unsupported curve is refused", der: pki.ekCert(t, &p224Key.PublicKey, nil), roots: pki.roots, now: testNow, want: attest.ErrKeyType},
		{name: "Garbage is malformed", der: []byte("garbage"), roots: pki.roots, now: testNow, want: attest.ErrMalformed},
		{name: "Trailing data after the certificate is malformed", der: append(bytes.Clone(good), 0, 0), roots: pki.roots, now: testNow, want: attest.ErrMalformed},
		{name: "An empty certificate is malformed", der: nil, roots: pki.roots, now: testNow, want: attest.ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := attest.VerifyEKCertificate(tc.der, tc.roots, tc.now)
			if tc.want == nil {
				if err != nil {
					t.Fatalf("VerifyEKCertificate: %v", err)
				}
				if cert == nil {
					t.Fatal("nil certificate without error")
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestEKTPMInfo(t *testing.T) {
	pki := newSWPKI(t)
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	cert, _ := x509.ParseCertificate(pki.ekCert(t, &k.PublicKey, nil))
	info, err := attest.EKTPMInfo(cert)
	if err != nil {
		t.Fatal(err)
	}
	if want := (attest.TPMInfo{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023"}); info != want {
		t.Errorf("EKTPMInfo = %+v, want %+v", info, want)
	}
}

func TestVerifyAKPublic(t *testing.T) {
	t.Parallel()
	e := newSWEvidence(t)
	with := func(f func(p *tpm2.TPMTPublic)) []byte {
		p := e.akPub
		f(&p)
		return public2B(p)
	}
	rsaPub := tpm2.RSASRKTemplate
	tests := []struct {
		name string
		pub  []byte
		want []error
	}{
		{name: "A restricted ECC signing AK is accepted", pub: e.akPub2B},
		{name: "A non-restricted key is refused as AK", pub: e.tlsPub2B, want: []error{attest.ErrAKNotRestricted}},
		{name: "A restricted decryption key is refused as AK", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true }), want: []error{attest.ErrAKAttributes}},
		{name: "A restricted key that cannot sign is refused as AK", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SignEncrypt = false }), want: []error{attest.ErrAKAttributes}},
		{name: "An AK that is not fixedTPM is refused as exportable", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }), want: []error{attest.ErrAKAttributes, attest.ErrKeyExportable}},
		{name: "An AK not generated in the TPM is refused as exportable", pub: with(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SensitiveDataOrigin = false }), want: []error{attest.ErrAKAttributes, attest.ErrKeyExportable}},
		{name: "An AK with a SHA-1 name is refused", pub: with(func(p *tpm2.TPMTPublic) { p.NameAlg = tpm2.TPMAlgSHA1 }), want: []error{attest.ErrKeyType}},
		{name: "An RSA key is refused as AK", pub: public2B(rsaPub), want: []error{attest.ErrKeyType}},
		{name: "An AK whose point is not on the curve is malformed", pub: with(func(p *tpm2.TPMTPublic) {
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}})
		}), want: []error{attest.ErrMalformed}},
		{name: "Trailing data after the AK public is malformed", pub: append(bytes.Clone(e.akPub2B), 0), want: []error{attest.ErrMalformed}},
		{name: "An empty AK public is malformed", pub: nil, want: []error{attest.ErrMalformed}},
		{name: "A truncated AK public is malformed", pub: e.akPub2B[:len(e.akPub2B)-3], want: []error{attest.ErrMalformed}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pub, err := attest.VerifyAKPublic(tc.pub)
			if len(tc.want) == 0 {
				if err != nil || pub == nil {
					t.Fatalf("VerifyAKPublic: %v", err)
				}
				return
			}
			for _, w := range tc.want {
				if !errors.Is(err, w) {
					t.Errorf("err = %v, want %v", err, w)
				}
			}
		})
	}
}

func TestVerifyCertify(t *testing.T) {
	t.Parallel()
	e := newSWEvidence(t)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	// mutated returns evidence re-signed by the AK after f changed it.
	mutated := func(f func(e *swEvidence)) *swEvidence {
		c := *e
		f(&c)
		return &c
	}
	tlsWith := func(f func(p *tpm2.TPMTPublic)) *swEvidence {
		return mutated(func(c *swEvidence) {
			p := c.tlsPub
			f(&p)
			c.tlsPub, c.tlsPub2B = p, public2B(p)
			c.certify(t, tpm2.TPMSTAttestCertify, c.nonce, mustName(t, &p))
		})
	}
	flipped := bytes.Clone(e.signature)
	flipped[len(flipped)-1] ^= 1

	tests := []struct {
		name  string
		ev    *swEvidence
		nonce []byte
		csr   any
		want  error
	}{
		{name: "A valid certification passes", ev: e, nonce: e.nonce, csr: &e.tlsKey.PublicKey},
		{name: "A tampered signature is refused", ev: mutated(func(c *swEvidence) { c.signature = flipped }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrCertifySignature},
		{name: "An attestation signed by another key is refused", ev: mutated(func(c *swEvidence) { c.signature = signECDSA(t, otherKey, c.attest2B[2:]) }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrCertifySignature},
		{name: "A tampered attestation is refused", ev: mutated(func(c *swEvidence) {
			c.attest2B = bytes.Clone(c.attest2B)
			c.attest2B[len(c.attest2B)-1] ^= 1
		}), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrCertifySignature},
		{name: "A different nonce is refused", ev: e, nonce: []byte("fedcba9876543210fedcba9876543210"), csr: &e.tlsKey.PublicKey, want: attest.ErrNonceMismatch},
		{name: "An empty nonce is refused", ev: mutated(func(c *swEvidence) { c.certify(t, tpm2.TPMSTAttestCertify, nil, mustName(t, &c.tlsPub)) }), nonce: nil, csr: &e.tlsKey.PublicKey, want: attest.ErrNonceMismatch},
		{name: "A quote instead of a certification is refused", ev: mutated(func(c *swEvidence) { c.certify(t, tpm2.TPMSTAttestTime, c.nonce, nil) }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrAttestType},
		{name: "A certification of another key is refused", ev: mutated(func(c *swEvidence) {
			p := eccPublic(tpmkey.TLSKeyTemplate(), &otherKey.PublicKey)
			c.tlsPub2B = public2B(p)
		}), nonce: e.nonce, csr: &otherKey.PublicKey, want: attest.ErrCertifyNameMismatch},
		{name: "A key that is not fixedTPM is refused as exportable", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedTPM = false }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyExportable},
		{name: "A key that is not fixedParent is refused as exportable", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.FixedParent = false }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyExportable},
		{name: "A key not generated in the TPM is refused as exportable", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.SensitiveDataOrigin = false }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyExportable},
		{name: "A restricted key is refused as TLS key", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Restricted = true }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyAttributes},
		{name: "A decryption key is refused as TLS key", ev: tlsWith(func(p *tpm2.TPMTPublic) { p.ObjectAttributes.Decrypt = true }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyAttributes},
		{name: "A P-384 TLS key is refused", ev: mutated(func(c *swEvidence) {
			k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
			tmpl := tpmkey.TLSKeyTemplate()
			d, _ := tmpl.Parameters.ECCDetail()
			d.CurveID = tpm2.TPMECCNistP384
			p := eccPublic(tmpl, &k.PublicKey)
			c.tlsPub2B = public2B(p)
			c.certify(t, tpm2.TPMSTAttestCertify, c.nonce, mustName(t, &p))
		}), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrKeyType},
		{name: "A CSR for another key is refused", ev: e, nonce: e.nonce, csr: &otherKey.PublicKey, want: attest.ErrCSRKeyMismatch},
		{name: "A CSR without key is refused", ev: e, nonce: e.nonce, csr: nil, want: attest.ErrCSRKeyMismatch},
		{name: "A truncated attestation is malformed", ev: mutated(func(c *swEvidence) { c.attest2B = c.attest2B[:10] }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrMalformed},
		{name: "A signature with trailing data is malformed", ev: mutated(func(c *swEvidence) { c.signature = append(bytes.Clone(c.signature), 0) }), nonce: e.nonce, csr: &e.tlsKey.PublicKey, want: attest.ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var csr any = tc.csr
			if k, ok := tc.csr.(*ecdsa.PublicKey); ok && k == nil {
				csr = nil
			}
			err := attest.VerifyCertify(&tc.ev.akPub, tc.ev.tlsPub2B, tc.ev.attest2B, tc.ev.signature, tc.nonce, csr)
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

func TestMakeCredentialInputErrors(t *testing.T) {
	t.Parallel()
	e := newSWEvidence(t)
	ek := tpm2.ECCEKTemplate
	tests := []struct {
		name   string
		ek     *tpm2.TPMTPublic
		akName []byte
		want   error
	}{
		{name: "A nil EK is refused", ek: nil, akName: mustName(t, &e.akPub), want: attest.ErrMalformed},
		{name: "A short AK name is refused", ek: &ek, akName: []byte{0}, want: attest.ErrMalformed},
		{name: "An AK name of the wrong length is refused", ek: &ek, akName: []byte{0, 0x0b, 1, 2}, want: attest.ErrMalformed},
		{name: "A SHA-1 AK name is refused", ek: &ek, akName: append([]byte{0, 0x04}, make([]byte, 20)...), want: attest.ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, _, err := attest.MakeCredential(rand.Reader, tc.ek, tc.akName); !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}
