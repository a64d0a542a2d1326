package tpmkey

import (
	"crypto"
	"encoding/asn1"
	"fmt"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Signer is the TPM-resident TLS key as a crypto.Signer. Each Sign is one
// TPM2_Sign; the private key never leaves the TPM. It is safe for concurrent
// use (calls are serialised on the TPM).
type Signer struct {
	keys *Keys
}

var _ crypto.Signer = (*Signer)(nil)

// Public returns the *ecdsa.PublicKey of the TLS key.
func (s *Signer) Public() crypto.PublicKey { return s.keys.tlsPub }

// Sign signs digest, which the caller has already hashed with
// opts.HashFunc() (SHA-256, SHA-384 or SHA-512), with ECDSA in the TPM and
// returns an ASN.1 DER ECDSA-Sig-Value, as crypto/ecdsa does. rand is unused:
// the TPM generates the nonce.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if opts == nil {
		return nil, fmt.Errorf("tpmkey: sign: nil SignerOpts: %w", ErrUnsupportedHash)
	}
	var alg tpm2.TPMIAlgHash
	switch h := opts.HashFunc(); h {
	case crypto.SHA256:
		alg = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		alg = tpm2.TPMAlgSHA384
	case crypto.SHA512:
		alg = tpm2.TPMAlgSHA512
	default:
		return nil, fmt.Errorf("tpmkey: sign with %v: %w", h, ErrUnsupportedHash)
	}
	if len(digest) != opts.HashFunc().Size() {
		return nil, fmt.Errorf("tpmkey: sign: digest is %d bytes, want %d: %w", len(digest), opts.HashFunc().Size(), ErrUnsupportedHash)
	}
	var sig *tpm2.TPMSSignatureECC
	err := s.keys.tpm.do(func(tr transport.TPM) error {
		return withKeys(tr, []*keyBlob{s.keys.tls}, func(hs []tpm2.AuthHandle) error {
			rsp, err := tpm2.Sign{
				KeyHandle: hs[0],
				Digest:    tpm2.TPM2BDigest{Buffer: digest},
				InScheme: tpm2.TPMTSigScheme{
					Scheme:  tpm2.TPMAlgECDSA,
					Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: alg}),
				},
				// A NULL ticket: the TLS key is not restricted, so the
				// TPM need not have computed the digest itself.
				Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
			}.Execute(tr)
			if err != nil {
				return fmt.Errorf("tpmkey: tpm2.Sign: %w", err)
			}
			sig, err = rsp.Signature.Signature.ECDSA()
			if err != nil || sig == nil {
				return fmt.Errorf("tpmkey: tpm2.Sign returned no ECDSA signature: %w", ErrMalformedResponse)
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	der, err := asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer),
		new(big.Int).SetBytes(sig.SignatureS.Buffer),
	})
	if err != nil {
		return nil, fmt.Errorf("tpmkey: encode signature: %w", err)
	}
	return der, nil
}
