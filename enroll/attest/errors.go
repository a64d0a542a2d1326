package attest

import "errors"

// Sentinel errors. Every verification failure wraps exactly the sentinel
// that names the failed check (an exportable AK wraps both ErrAKAttributes
// and ErrKeyExportable), so callers can map it to an API error and an audit
// record with errors.Is.
var (
	// ErrMalformed means an input does not decode as the expected TPM or
	// X.509 structure, has trailing data, or is not canonically encoded.
	ErrMalformed = errors.New("attest: malformed input")
	// ErrEKChainInvalid means the EK certificate does not chain to a
	// configured TPM manufacturer root, is expired, is a CA, has an
	// unexpected critical extension or extended key usage.
	ErrEKChainInvalid = errors.New("attest: EK certificate chain invalid")
	// ErrKeyType means a key's algorithm, curve, size, scheme or name
	// algorithm is not one this verifier accepts.
	ErrKeyType = errors.New("attest: unsupported key type")
	// ErrAKNotRestricted means the AK is not a restricted key, so it could
	// sign arbitrary data that mimics a TPM attestation.
	ErrAKNotRestricted = errors.New("attest: AK is not restricted")
	// ErrAKAttributes means the AK is not a signing-only key, or (together
	// with ErrKeyExportable) not bound to its TPM.
	ErrAKAttributes = errors.New("attest: AK attributes invalid")
	// ErrKeyExportable means a key is not fixedTPM, fixedParent and
	// sensitiveDataOrigin: it was imported, or can be duplicated out of
	// the TPM.
	ErrKeyExportable = errors.New("attest: key can exist outside the TPM")
	// ErrKeyAttributes means the certified TLS key is not a non-restricted,
	// signing-only key.
	ErrKeyAttributes = errors.New("attest: key attributes invalid")
	// ErrCertifySignature means the certify signature is not a valid
	// signature by the AK over the attestation.
	ErrCertifySignature = errors.New("attest: certify signature invalid")
	// ErrAttestType means the attestation is not TPM_ST_ATTEST_CERTIFY.
	ErrAttestType = errors.New("attest: attestation is not a certification")
	// ErrNonceMismatch means the attestation's qualifying data is not the
	// server's nonce (a replay, or a nonce from another challenge).
	ErrNonceMismatch = errors.New("attest: nonce mismatch")
	// ErrCertifyNameMismatch means the name in the attestation is not the
	// name of the public area the device presented.
	ErrCertifyNameMismatch = errors.New("attest: certified name mismatch")
	// ErrCSRKeyMismatch means the CSR's public key is not the certified
	// TPM key.
	ErrCSRKeyMismatch = errors.New("attest: CSR key is not the certified key")
)
