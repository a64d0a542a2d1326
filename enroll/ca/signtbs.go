package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/x509"
	"errors"
	"io"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// Signing a certificate with a key held in this process's memory.
//
// x509.CreateCertificate verifies every signature it has just made, "to
// ensure the crypto.Signer behaved correctly": a guard against a faulty
// signer (an HSM, a TPM, a remote key). For Go's own ECDSA and Ed25519
// implementations in this process the check repeats what the signature
// has just computed, and an ECDSA P-256 verification costs about twice the
// signature: 107 µs of the 1,550 µs of server CPU a token enrollment
// took (docs/performance.md, "Enrollment"). For those keys the
// certificate is encoded by x509.CreateCertificate as before (every field,
// every template check), its TBSCertificate signed by the key through
// crypto.SignMessage as CreateCertificate would, and the three parts
// joined as CreateCertificate joins them. Every other signer (PKCS#11,
// TPM, RSA, a wrapper this package does not know) goes through
// x509.CreateCertificate with its check, unchanged.

// InMemory is implemented by a key store's key that is held in this
// process's memory (a PEM file's key): InMemory returns the key itself.
type InMemory interface {
	InMemory() crypto.Signer
}

// errTBSCaptured stops x509.CreateCertificate once the TBSCertificate is
// encoded.
var errTBSCaptured = errors.New("ca: TBSCertificate captured")

// tbsCapture is a crypto.MessageSigner that keeps the message
// x509.CreateCertificate gives it to sign (the DER TBSCertificate) and the
// signer options, and signs nothing.
type tbsCapture struct {
	pub  crypto.PublicKey
	tbs  []byte
	opts crypto.SignerOpts
}

func (c *tbsCapture) Public() crypto.PublicKey { return c.pub }

func (c *tbsCapture) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("ca: tbsCapture: Sign without SignMessage")
}

func (c *tbsCapture) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	c.tbs, c.opts = msg, opts
	return nil, errTBSCaptured
}

// inProcessKey returns key's in-memory ECDSA or Ed25519 key, or nil.
func inProcessKey(key crypto.Signer) crypto.Signer {
	if m, ok := key.(InMemory); ok {
		key = m.InMemory()
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		return k
	case ed25519.PrivateKey:
		return k
	}
	return nil
}

// createCertificate is x509.CreateCertificate; for an in-process ECDSA or
// Ed25519 key without the verification of its own signature (above).
func createCertificate(r io.Reader, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) ([]byte, error) {
	k := inProcessKey(key)
	if k == nil {
		return x509.CreateCertificate(r, tmpl, parent, pub, key)
	}
	capt := &tbsCapture{pub: k.Public()}
	if _, err := x509.CreateCertificate(r, tmpl, parent, pub, capt); !errors.Is(err, errTBSCaptured) {
		if err == nil {
			err = errors.New("ca: x509.CreateCertificate did not sign through SignMessage")
		}
		return nil, err
	}
	algID, err := tbsSignatureAlgorithm(capt.tbs)
	if err != nil {
		return nil, err
	}
	sig, err := crypto.SignMessage(k, r, capt.tbs, capt.opts)
	if err != nil {
		return nil, err
	}
	// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
	// signatureValue BIT STRING }, the algorithm as the TBSCertificate
	// states it (RFC 5280 4.1.1.2: the two must be equal).
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(capt.tbs)
		b.AddBytes(algID)
		b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) {
			b.AddUint8(0) // no unused bits
			b.AddBytes(sig)
		})
	})
	return b.Bytes()
}

// tbsSignatureAlgorithm returns the DER AlgorithmIdentifier of a DER
// TBSCertificate (its signature field).
func tbsSignatureAlgorithm(tbs []byte) ([]byte, error) {
	in := cryptobyte.String(tbs)
	var body, algID cryptobyte.String
	if !in.ReadASN1(&body, cbasn1.SEQUENCE) || !in.Empty() ||
		!body.SkipOptionalASN1(cbasn1.Tag(0).Constructed().ContextSpecific()) || // version
		!body.SkipASN1(cbasn1.INTEGER) || // serialNumber
		!body.ReadASN1Element(&algID, cbasn1.SEQUENCE) {
		return nil, errors.New("ca: malformed TBSCertificate")
	}
	return algID, nil
}
