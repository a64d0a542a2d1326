package api

import "time"

// TPM enrollment: two round trips (see docs and enroll/attest).
//
//  1. The device creates its AK and TLS key in the TPM and POSTs a
//     TPMChallengeRequest to PathTPMChallenge. The server verifies the EK
//     certificate chain and the AK public area, encrypts a secret to the EK
//     for the AK (TPM2_MakeCredential) and answers TPMChallengeResponse.
//  2. The device recovers the secret (TPM2_ActivateCredential), has the AK
//     certify the TLS key with Nonce as qualifying data (TPM2_Certify), signs
//     a CSR with the TLS key and POSTs a TPMCompleteRequest to
//     PathTPMComplete. The server checks the secret in constant time, the
//     certification and the CSR, and answers EnrollResponse.
//
// TPM structures travel exactly as the TPM produced them (marshalled by
// go-tpm, big-endian TPM wire format), base64 in JSON.

// TPMChallengeRequest starts a TPM enrollment (round 1).
type TPMChallengeRequest struct {
	// DeviceID is the device ID the device asks for. Optional: policy may
	// derive it from the EK instead.
	DeviceID string `json:"device_id,omitempty"`
	// EKCert is the endorsement key certificate, DER, as read from the
	// TPM's NV memory (without padding).
	EKCert []byte `json:"ek_cert"`
	// AKPublic is the attestation key's public area, TPM2B_PUBLIC.
	AKPublic []byte `json:"ak_public"`
}

// TPMChallengeResponse carries the credential challenge (round 1 answer).
type TPMChallengeResponse struct {
	// ChallengeID identifies the server-side challenge state; single use.
	ChallengeID string `json:"challenge_id"`
	// CredentialBlob is the TPM2B_ID_OBJECT contents (no size prefix) for
	// TPM2_ActivateCredential.
	CredentialBlob []byte `json:"credential_blob"`
	// EncryptedSecret is the TPM2B_ENCRYPTED_SECRET contents (no size
	// prefix) for TPM2_ActivateCredential.
	EncryptedSecret []byte `json:"encrypted_secret"`
	// Nonce is the qualifying data the device passes to TPM2_Certify.
	Nonce []byte `json:"nonce"`
	// ExpiresAt is when the challenge stops being accepted.
	ExpiresAt time.Time `json:"expires_at"`
}

// TPMCompleteRequest completes a TPM enrollment (round 2). The answer is an
// EnrollResponse.
type TPMCompleteRequest struct {
	// ChallengeID is TPMChallengeResponse.ChallengeID.
	ChallengeID string `json:"challenge_id"`
	// Secret is the credential secret TPM2_ActivateCredential recovered.
	Secret []byte `json:"secret"`
	// TLSPublic is the TLS key's public area, TPM2B_PUBLIC.
	TLSPublic []byte `json:"tls_public"`
	// CertifyInfo is TPM2_Certify's certifyInfo over the TLS key,
	// TPM2B_ATTEST.
	CertifyInfo []byte `json:"certify_info"`
	// CertifySignature is the AK's signature over the TPMS_ATTEST inside
	// CertifyInfo, TPMT_SIGNATURE.
	CertifySignature []byte `json:"certify_signature"`
	// CSR is a PKCS#10 certificate request, DER, signed by the TLS key.
	CSR []byte `json:"csr"`
}
