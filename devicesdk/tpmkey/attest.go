package tpmkey

import (
	"bytes"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// Attestation is the evidence a device sends to the enrollment server. The
// byte fields are TPM structures exactly as the TPM produced them, so the
// server can recompute names and verify signatures over the same bytes.
type Attestation struct {
	// EKCert is the EK certificate, DER.
	EKCert []byte
	// AKPublic is the AK public area, TPM2B_PUBLIC.
	AKPublic []byte
	// TLSPublic is the TLS key public area, TPM2B_PUBLIC.
	TLSPublic []byte
	// CertifyInfo is TPM2_Certify's certifyInfo (TPM2B_ATTEST) over the TLS
	// key, signed by the AK, qualified with the server's nonce.
	CertifyInfo []byte
	// CertifySignature is the AK's signature over the TPMS_ATTEST inside
	// CertifyInfo, TPMT_SIGNATURE.
	CertifySignature []byte
}

// ActivateCredential recovers the secret the server encrypted to this TPM's
// EK for this AK (TPM2_ActivateCredential, TPM 2.0 Part 1, 24). It succeeds
// only in the TPM that holds both the EK and the AK named in the credential;
// otherwise it fails with ErrActivation.
func (k *Keys) ActivateCredential(credBlob, encryptedSecret []byte) ([]byte, error) {
	var secret []byte
	err := k.tpm.do(func(tr transport.TPM) error {
		return withKeys(tr, []*keyBlob{k.ak}, func(hs []tpm2.AuthHandle) error {
			ekH, _, ekName, err := createEK(tr, k.ek)
			if err != nil {
				return err
			}
			defer flush(tr, ekH)
			rsp, err := tpm2.ActivateCredential{
				ActivateHandle: hs[0],
				KeyHandle: tpm2.AuthHandle{
					Handle: ekH,
					Name:   tpm2.TPM2BName{Buffer: ekName},
					Auth:   ekAuth(k.ek.template),
				},
				CredentialBlob: tpm2.TPM2BIDObject{Buffer: credBlob},
				Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encryptedSecret},
			}.Execute(tr)
			if err != nil {
				return fmt.Errorf("tpmkey: tpm2.ActivateCredential: %w: %w", ErrActivation, err)
			}
			secret = bytes.Clone(rsp.CertInfo.Buffer)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return secret, nil
}

// Certify has the AK certify the TLS key (TPM2_Certify, Part 3, 18.2) with
// nonce as qualifying data. It returns the TPM2B_ATTEST and the
// TPMT_SIGNATURE, both marshalled.
func (k *Keys) Certify(nonce []byte) (certifyInfo, signature []byte, err error) {
	err = k.tpm.do(func(tr transport.TPM) error {
		return withKeys(tr, []*keyBlob{k.tls, k.ak}, func(hs []tpm2.AuthHandle) error {
			rsp, err := tpm2.Certify{
				ObjectHandle:   hs[0],
				SignHandle:     hs[1],
				QualifyingData: tpm2.TPM2BData{Buffer: nonce},
				InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			}.Execute(tr)
			if err != nil {
				return fmt.Errorf("tpmkey: tpm2.Certify: %w", err)
			}
			certifyInfo = tpm2.Marshal(rsp.CertifyInfo)
			signature = tpm2.Marshal(rsp.Signature)
			return nil
		})
	})
	if err != nil {
		return nil, nil, err
	}
	return certifyInfo, signature, nil
}

// Attest returns the complete evidence for nonce: EK certificate, AK and TLS
// key public areas, and the TLS key certified by the AK.
func (k *Keys) Attest(nonce []byte) (*Attestation, error) {
	info, sig, err := k.Certify(nonce)
	if err != nil {
		return nil, err
	}
	return &Attestation{
		EKCert:           bytes.Clone(k.ek.CertDER),
		AKPublic:         k.AKPublic(),
		TLSPublic:        k.TLSPublic(),
		CertifyInfo:      info,
		CertifySignature: sig,
	}, nil
}
