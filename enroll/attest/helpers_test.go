package attest_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/google/go-tpm/tpm2"
)

// This file builds TPM structures in software for the pure verifier tests
// and the fuzz seeds. It is not a TPM: the swtpm tests exercise real ones.

var testNow = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)

func eccPublic(tmpl tpm2.TPMTPublic, k *ecdsa.PublicKey) tpm2.TPMTPublic {
	size := (k.Curve.Params().BitSize + 7) / 8
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, size))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, size))},
	})
	return tmpl
}

func public2B(p tpm2.TPMTPublic) []byte { return tpm2.Marshal(tpm2.New2B(p)) }

// swEvidence is a software-made AK, TLS key and certification.
type swEvidence struct {
	akKey     *ecdsa.PrivateKey
	akPub     tpm2.TPMTPublic
	akPub2B   []byte
	tlsKey    *ecdsa.PrivateKey
	tlsPub    tpm2.TPMTPublic
	tlsPub2B  []byte
	nonce     []byte
	attest2B  []byte
	signature []byte
}

func newSWEvidence(t testing.TB) *swEvidence {
	t.Helper()
	e := &swEvidence{nonce: []byte("0123456789abcdef0123456789abcdef")}
	e.akKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	e.tlsKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	e.akPub = eccPublic(tpmkey.AKTemplate(), &e.akKey.PublicKey)
	e.akPub2B = public2B(e.akPub)
	e.tlsPub = eccPublic(tpmkey.TLSKeyTemplate(), &e.tlsKey.PublicKey)
	e.tlsPub2B = public2B(e.tlsPub)
	e.certify(t, tpm2.TPMSTAttestCertify, e.nonce, mustName(t, &e.tlsPub))
	return e
}

// certify (re)builds the attestation and signs it with the software AK.
func (e *swEvidence) certify(t testing.TB, typ tpm2.TPMST, nonce, name []byte) {
	t.Helper()
	att := tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            typ,
		QualifiedSigner: tpm2.TPM2BName{Buffer: mustName(t, &e.akPub)},
		ExtraData:       tpm2.TPM2BData{Buffer: nonce},
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{
			Name:          tpm2.TPM2BName{Buffer: name},
			QualifiedName: tpm2.TPM2BName{Buffer: childQN(name)},
		}),
	}
	if typ != tpm2.TPMSTAttestCertify {
		att.Attested = tpm2.NewTPMUAttest(typ, &tpm2.TPMSTimeAttestInfo{})
	}
	raw := tpm2.Marshal(att)
	e.attest2B = tpm2.Marshal(tpm2.TPM2BAttest(tpm2.BytesAs2B[tpm2.TPMSAttest](raw)))
	e.signature = signECDSA(t, e.akKey, raw)
}

// srkQN stands for the qualified name of the device's SRK, a primary key of
// the owner hierarchy.
var srkQN = append([]byte{0, 0x0b}, make([]byte, 32)...)

// childQN is the qualified name of an object named name whose parent is
// the SRK (TPM 2.0 Part 1, 16.6): nameAlg || H(QN(parent) || name).
func childQN(name []byte) []byte {
	h := sha256.New()
	h.Write(srkQN)
	h.Write(name)
	return h.Sum([]byte{0, 0x0b})
}

func signECDSA(t testing.TB, k *ecdsa.PrivateKey, msg []byte) []byte {
	t.Helper()
	d := sha256.Sum256(msg)
	r, s, err := ecdsa.Sign(rand.Reader, k, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: r.FillBytes(make([]byte, 32))},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s.FillBytes(make([]byte, 32))},
		}),
	})
}

func mustName(t testing.TB, p *tpm2.TPMTPublic) []byte {
	t.Helper()
	n, err := tpm2.ObjectName(p)
	if err != nil {
		t.Fatal(err)
	}
	return n.Buffer
}

// swPKI is a software TPM manufacturer CA issuing swtpm-like EK
// certificates.
type swPKI struct {
	root    *x509.Certificate
	rootKey *ecdsa.PrivateKey
	roots   *x509.CertPool
}

func newSWPKI(t testing.TB) *swPKI {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "sw TPM manufacturer"},
		NotBefore: testNow.Add(-24 * time.Hour), NotAfter: testNow.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	return &swPKI{root: root, rootKey: k, roots: pool}
}

var (
	oidSAN    = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidTPMMfr = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMMdl = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVer = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	oidEKCert = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
)

// tcgSAN is a subjectAltName with one directoryName of the given
// attributes, as swtpm writes it.
func tcgSAN(t testing.TB, atvs ...pkix.AttributeTypeAndValue) []byte {
	t.Helper()
	var rdns pkix.RDNSequence
	for _, a := range atvs {
		rdns = append(rdns, pkix.RelativeDistinguishedNameSET{a})
	}
	rb, err := asn1.Marshal(rdns)
	if err != nil {
		t.Fatal(err)
	}
	v, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rb}})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func stdTPMAttrs() []pkix.AttributeTypeAndValue {
	return []pkix.AttributeTypeAndValue{
		{Type: oidTPMMfr, Value: "id:00001014"},
		{Type: oidTPMMdl, Value: "swtpm"},
		{Type: oidTPMVer, Value: "id:20191023"},
	}
}

// ekCert issues an EK certificate for key; mutate adjusts the template.
// An RSA key gets keyEncipherment, an ECC key keyAgreement, as the TCG EK
// Credential Profile says.
func (p *swPKI) ekCert(t testing.TB, key any, mutate func(*x509.Certificate)) []byte {
	t.Helper()
	ku := x509.KeyUsageKeyAgreement
	if _, ok := key.(*rsa.PublicKey); ok {
		ku = x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:       big.NewInt(2),
		NotBefore:          testNow.Add(-time.Hour),
		NotAfter:           testNow.Add(time.Hour),
		KeyUsage:           ku,
		UnknownExtKeyUsage: []asn1.ObjectIdentifier{oidEKCert},
		ExtraExtensions: []pkix.Extension{
			{Id: oidSAN, Critical: true, Value: tcgSAN(t, stdTPMAttrs()...)},
		},
		BasicConstraintsValid: true,
	}
	if mutate != nil {
		mutate(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.root, key, p.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
