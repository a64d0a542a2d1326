package api

import (
	"crypto/sha256"
	"encoding/hex"
	"time"
)

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

// EKFingerprint identifies a TPM by its endorsement key: lowercase hex
// SHA-256 of the EK's DER SubjectPublicKeyInfo (x509.Certificate's
// RawSubjectPublicKeyInfo). The registry keys EK registrations by it.
func EKFingerprint(spkiDER []byte) string {
	h := sha256.Sum256(spkiDER)
	return hex.EncodeToString(h[:])
}

// AutoDeviceIDPrefix starts every device ID assigned under the manufacturer
// policy.
const AutoDeviceIDPrefix = "tpm-"

// AutoDeviceID is the device ID the server assigns, under the manufacturer
// policy, to an EK that was not registered: "tpm-" and the first 16 hex
// digits of its fingerprint. A device computes it from its own EK
// certificate to know its ID before enrolling.
func AutoDeviceID(spkiDER []byte) string {
	return AutoDeviceIDPrefix + EKFingerprint(spkiDER)[:16]
}

// EKRegisterRequest registers a TPM's endorsement key for a device at
// manufacturing (admin API, operator mTLS). Answered by EKRegistration.
type EKRegisterRequest struct {
	// EKCert is the EK certificate, DER.
	EKCert   []byte `json:"ek_cert"`
	DeviceID string `json:"device_id"`
	// Group defaults to "default".
	Group string `json:"group,omitempty"`
	// Line is the line of the import file this entry comes from, echoed in
	// problems (imports only; optional).
	Line int `json:"line,omitempty"`
}

// EKRegistration is one registered EK.
type EKRegistration struct {
	DeviceID      string `json:"device_id"`
	Group         string `json:"group"`
	EKFingerprint string `json:"ek_fingerprint"`
}

// EKImportRequest registers many EKs in one transaction: all or none.
type EKImportRequest struct {
	Entries []EKRegisterRequest `json:"entries"`
	// DryRun checks every entry and reports problems, but registers
	// nothing (success: status 200 and Registered lists what would be).
	DryRun bool `json:"dry_run,omitempty"`
}

// EKImportResponse answers an import: on success Registered lists every
// entry; on refusal (status 422, code "import_refused") Problems lists every
// bad entry and nothing was registered.
type EKImportResponse struct {
	Registered []EKRegistration `json:"registered,omitempty"`
	Problems   []ImportProblem  `json:"problems,omitempty"`
}

// ImportProblem is one refused entry of an import.
type ImportProblem struct {
	// Index is the entry's position in EKImportRequest.Entries.
	Index int `json:"index"`
	// Line is the entry's Line, if the client set it.
	Line     int    `json:"line,omitempty"`
	DeviceID string `json:"device_id,omitempty"`
	// Code is a stable reason, e.g. "ek_chain_invalid",
	// "ek_already_registered", "invalid_device_id".
	Code    string `json:"code"`
	Message string `json:"message"`
}

// MaxImportEntries bounds one import request.
const MaxImportEntries = 10000

// MaxImportBodyBytes is the largest import request body the server reads
// (EK certificates are 1-2 KiB, base64 in JSON).
const MaxImportBodyBytes = 32 << 20
