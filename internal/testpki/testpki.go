// Package testpki makes certificates for tests: throwaway CAs and leaves with
// whatever flaw a test needs (unknown CA, self-signed, expired, wrong EKU).
// It is for tests only; production certificates come from enroll/ca.
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"net/url"
	"testing"
	"time"
)

// CA is a throwaway certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA returns a self-signed P-256 CA.
func NewCA(t testing.TB, cn string) *CA {
	t.Helper()
	k := NewKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: c, Key: k}
}

// NewKey returns a fresh P-256 key.
func NewKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Leaf describes a leaf certificate.
type Leaf struct {
	URI       string
	CN        string
	NotBefore time.Time
	NotAfter  time.Time
	EKU       []x509.ExtKeyUsage
}

// Issue signs l with ca (nil ca: self-signed) and returns it as a
// tls.Certificate with its key.
func Issue(t testing.TB, ca *CA, l Leaf) tls.Certificate {
	t.Helper()
	k := NewKey(t)
	if l.NotBefore.IsZero() {
		l.NotBefore = time.Now().Add(-time.Hour)
	}
	if l.NotAfter.IsZero() {
		l.NotAfter = time.Now().Add(time.Hour)
	}
	if l.EKU == nil {
		l.EKU = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: l.CN},
		NotBefore: l.NotBefore, NotAfter: l.NotAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: l.EKU,
	}
	if l.URI != "" {
		u, err := url.Parse(l.URI)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	parent, signer := tmpl, k
	if ca != nil {
		parent, signer = ca.Cert, ca.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, k.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: k, Leaf: leaf}
}

// OIDs of the TCG EK Credential Profile 2.3.
var (
	OIDTPMManufacturer    = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	OIDTPMModel           = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	OIDTPMVersion         = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	OIDTCGKpEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	oidSubjectAltName     = asn1.ObjectIdentifier{2, 5, 29, 17}
)

// TCGSAN is the value of an EK certificate's subjectAltName: one
// directoryName with the TPM manufacturer, model and version, as swtpm
// writes it.
func TCGSAN(manufacturer, model, version string) []byte {
	rdns := pkix.RDNSequence{
		{{Type: OIDTPMManufacturer, Value: manufacturer}},
		{{Type: OIDTPMModel, Value: model}},
		{{Type: OIDTPMVersion, Value: version}},
	}
	rb, err := asn1.Marshal(rdns)
	if err != nil {
		panic(err)
	}
	v, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rb}})
	if err != nil {
		panic(err)
	}
	return v
}

// EKTemplate is a certificate template for an EK certificate of pub as the
// TCG EK Credential Profile describes one (and swtpm issues): keyEncipherment
// for RSA, keyAgreement for ECC, the tcg-kp-EKCertificate extended key usage
// and a critical subjectAltName with the TPM manufacturer "id:00001014",
// model "swtpm" and version "id:20191023".
func EKTemplate(pub crypto.PublicKey) *x509.Certificate {
	ku := x509.KeyUsageKeyAgreement
	if _, ok := pub.(*rsa.PublicKey); ok {
		ku = x509.KeyUsageKeyEncipherment
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return &x509.Certificate{
		SerialNumber: serial, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: ku, UnknownExtKeyUsage: []asn1.ObjectIdentifier{OIDTCGKpEKCertificate}, BasicConstraintsValid: true,
		ExtraExtensions: []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: TCGSAN("id:00001014", "swtpm", "id:20191023")}},
	}
}

// SelfSignedEK returns a self-signed, profile-conformant EK certificate for
// a fresh P-256 key: for registration tests of a server without
// manufacturer roots.
func SelfSignedEK(t testing.TB) []byte {
	t.Helper()
	k := NewKey(t)
	tmpl := EKTemplate(k.Public())
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// rocaPrimes are the primes of M in the ROCA construction (Nemec et al.,
// "The Return of Coppersmith's Attack", CCS 2017): 2 up to 167. The
// fingerprint only looks at 3..167; including 2 makes p odd.
var rocaPrimes = []int64{2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
	101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167}

// ROCAPrime returns a prime of bits bits with the structure of the
// vulnerable Infineon RSALib: p = k*M + (65537^a mod M).
func ROCAPrime(t testing.TB, bits int) *big.Int {
	t.Helper()
	m := big.NewInt(1)
	for _, p := range rocaPrimes {
		m.Mul(m, big.NewInt(p))
	}
	g := big.NewInt(65537)
	// k in [1.5*2^(bits-1)/M, 2^bits/M): p has bits bits and the product
	// of two such primes has 2*bits bits.
	lo := new(big.Int).Div(new(big.Int).Lsh(big.NewInt(3), uint(bits-2)), m)
	lo.Add(lo, big.NewInt(1))
	hi := new(big.Int).Div(new(big.Int).Lsh(big.NewInt(1), uint(bits)), m)
	span := new(big.Int).Sub(hi, lo)
	for range 100000 {
		a, _ := rand.Int(rand.Reader, m)
		k, _ := rand.Int(rand.Reader, span)
		k.Add(k, lo)
		p := new(big.Int).Exp(g, a, m)
		p.Add(p, new(big.Int).Mul(k, m))
		if p.BitLen() == bits && p.ProbablyPrime(20) {
			return p
		}
	}
	t.Fatal("no ROCA-structured prime found")
	return nil
}

// ROCAModulus is an RSA-2048 modulus from two ROCA-structured primes.
func ROCAModulus(t testing.TB) *big.Int {
	t.Helper()
	n := new(big.Int).Mul(ROCAPrime(t, 1024), ROCAPrime(t, 1024))
	if n.BitLen() != 2048 {
		t.Fatalf("ROCA modulus has %d bits", n.BitLen())
	}
	return n
}
