package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"
)

// inMemoryKey is a key store's in-memory key (as keystore's file keys).
type inMemoryKey struct{ crypto.Signer }

func (k inMemoryKey) InMemory() crypto.Signer { return k.Signer }

// faultySigner signs with its key, then flips a bit of the signature.
type faultySigner struct{ crypto.Signer }

func (f faultySigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := f.Signer.Sign(r, digest, opts)
	if err == nil {
		sig[len(sig)/2] ^= 1
	}
	return sig, err
}

func leafTemplate(serial int64) *x509.Certificate {
	now := time.Now()
	return &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: "dev-1", OrganizationalUnit: []string{"device"}},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{{Scheme: "spiffe", Host: "test.fleetgate", Path: "/device/dev-1"}},
		OCSPServer:   []string{"https://127.0.0.1:8443/ocsp"},
	}
}

// The certificate of an in-process key is the one x509.CreateCertificate
// makes (the same TBSCertificate byte for byte, the same algorithm), and
// its signature verifies under the issuer's key, for each key type.
func TestCreateCertificateInProcessKeys(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	leaf, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, key := range map[string]crypto.Signer{"P-256": p256, "P-384": p384, "Ed25519": ed, "P-256 in a key store": inMemoryKey{p256}} {
		t.Run(name, func(t *testing.T) {
			if inProcessKey(key) == nil {
				t.Fatalf("%T not taken as an in-process key", key)
			}
			caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuing"},
				NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
				KeyUsage: x509.KeyUsageCertSign, SubjectKeyId: []byte{1, 2, 3, 4}}
			caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, key.Public(), key)
			if err != nil {
				t.Fatal(err)
			}
			parent, err := x509.ParseCertificate(caDER)
			if err != nil {
				t.Fatal(err)
			}
			want, err := x509.CreateCertificate(rand.Reader, leafTemplate(7), parent, leaf.Public(), key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := createCertificate(rand.Reader, leafTemplate(7), parent, leaf.Public(), key)
			if err != nil {
				t.Fatal(err)
			}
			w, _ := x509.ParseCertificate(want)
			g, err := x509.ParseCertificate(got)
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if !bytes.Equal(g.RawTBSCertificate, w.RawTBSCertificate) || g.SignatureAlgorithm != w.SignatureAlgorithm ||
				len(got) > len(want)+2 || len(got) < len(want)-2 { // ECDSA signatures differ in length by a byte or two
				t.Fatalf("certificate differs from x509.CreateCertificate's:\n got %x\nwant %x", got, want)
			}
			if err := g.CheckSignatureFrom(parent); err != nil {
				t.Fatalf("signature: %v", err)
			}
			// A template x509 refuses is refused the same.
			bad := leafTemplate(-1)
			if _, err := createCertificate(rand.Reader, bad, parent, leaf.Public(), key); err == nil || !strings.Contains(err.Error(), "serial number must be positive") {
				t.Fatalf("negative serial: %v", err)
			}
			// A key that is not the parent's is refused.
			other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if _, err := createCertificate(rand.Reader, leafTemplate(8), parent, leaf.Public(), other); err == nil {
				t.Fatal("a key that is not the issuer's signed")
			}
		})
	}
}

// Any other signer (an HSM, a TPM, a wrapper) goes through
// x509.CreateCertificate, which verifies what it signed: a faulty
// signature is refused.
func TestCreateCertificateOtherSignersChecked(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "issuing"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, key.Public(), key)
	parent, _ := x509.ParseCertificate(caDER)
	f := faultySigner{key}
	if inProcessKey(f) != nil {
		t.Fatal("a wrapper taken as an in-process key")
	}
	_, err := createCertificate(rand.Reader, leafTemplate(9), parent, leaf.Public(), f)
	if err == nil || !strings.Contains(err.Error(), "signature returned by signer is invalid") {
		t.Fatalf("faulty signer: %v", err)
	}
}
