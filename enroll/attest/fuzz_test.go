package attest_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"testing"

	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/google/go-tpm/tpm2"
)

// The fuzz targets check that untrusted input never panics and that success
// implies the properties the caller relies on. Seeds are generated here, in
// software, from the same templates the device uses.

func FuzzVerifyAKPublic(f *testing.F) {
	e := newSWEvidence(f)
	f.Add(e.akPub2B)
	f.Add(e.tlsPub2B)
	f.Add(public2B(tpm2.RSASRKTemplate))
	f.Add([]byte{})
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		pub, err := attest.VerifyAKPublic(data)
		if err != nil {
			if pub != nil {
				t.Fatal("public area returned with an error")
			}
			return
		}
		a := pub.ObjectAttributes
		if !a.Restricted || !a.SignEncrypt || a.Decrypt || !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
			t.Fatalf("accepted AK with attributes %+v", a)
		}
		if _, err := attest.Name(pub); err != nil {
			t.Fatalf("accepted AK has no name: %v", err)
		}
	})
}

func FuzzVerifyCertify(f *testing.F) {
	e := newSWEvidence(f)
	f.Add(e.tlsPub2B, e.attest2B, e.signature, e.nonce)
	f.Add(e.akPub2B, e.attest2B, e.signature, e.nonce)
	f.Add([]byte{}, []byte{}, []byte{}, []byte{})
	f.Add(e.tlsPub2B, e.attest2B[:len(e.attest2B)/2], e.signature[:4], e.nonce)
	f.Fuzz(func(t *testing.T, tlsPub, att, sig, nonce []byte) {
		err := attest.VerifyCertify(&e.akPub, tlsPub, att, sig, nonce, &e.tlsKey.PublicKey)
		if err == nil && !bytes.Equal(tlsPub, e.tlsPub2B) {
			// Only the AK can sign, and it only signed e's attestation.
			t.Fatalf("accepted a TLS public area the AK never certified: %x", tlsPub)
		}
	})
}

func FuzzVerifyEKCertificate(f *testing.F) {
	pki := newSWPKI(f)
	k256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	k384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	f.Add(pki.ekCert(f, &k256.PublicKey, nil))
	f.Add(pki.ekCert(f, &k384.PublicKey, nil))
	f.Add(pki.root.Raw)
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		cert, err := attest.VerifyEKCertificate(der, pki.roots, testNow)
		if err != nil {
			return
		}
		if cert == nil || cert.IsCA {
			t.Fatal("accepted a nil or CA certificate")
		}
		if err := cert.CheckSignatureFrom(pki.root); err != nil {
			t.Fatalf("accepted a certificate the manufacturer did not sign: %v", err)
		}
		if _, err := attest.EKPublicFromCert(cert); err != nil {
			t.Fatalf("accepted an EK without a template: %v", err)
		}
	})
}
