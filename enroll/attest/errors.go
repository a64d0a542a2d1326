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

	// ErrEKCertMalformed means the EK certificate is empty, too large or
	// does not parse as an X.509 certificate.
	ErrEKCertMalformed = errors.New("attest: EK certificate malformed")
	// ErrEKKeyUsage means the certificate's key usage is not an EK's
	// (TCG EK Credential Profile 2.3, 3.2.8): keyEncipherment for an RSA EK,
	// keyAgreement for an ECC EK, and no signing usage. It is wrapped
	// together with ErrEKChainInvalid.
	ErrEKKeyUsage = errors.New("attest: EK certificate key usage is not an EK's")
	// ErrEKSAN means the certificate's subjectAltName is absent or holds
	// anything but the TCG directoryName with the TPM manufacturer, model
	// and version (Profile 3.2.9). Wrapped together with ErrEKChainInvalid.
	ErrEKSAN = errors.New("attest: EK certificate subjectAltName is not the TCG TPM identification")
	// ErrEKEKU means the certificate has an extended key usage other than
	// exactly tcg-kp-EKCertificate (Profile 3.2.16). Wrapped together with
	// ErrEKChainInvalid.
	ErrEKEKU = errors.New("attest: EK certificate extended key usage is not tcg-kp-EKCertificate")
	// ErrEKDenied means the TPM (manufacturer, model, firmware version from
	// the EK certificate) matches a rule of the operator's deny-list.
	ErrEKDenied = errors.New("attest: TPM is on the deny-list")
	// ErrEKROCA means the EK is an RSA key whose modulus has the structure
	// of CVE-2017-15361 (ROCA): its private key can be computed from it.
	ErrEKROCA = errors.New("attest: EK modulus is ROCA-vulnerable (CVE-2017-15361)")
	// ErrAKPolicy means the AK can be authorized by a policy (non-empty
	// authPolicy, adminWithPolicy) or not by its authValue (userWithAuth
	// clear): it could be used outside the enrollment flow.
	ErrAKPolicy = errors.New("attest: AK authorization policy not allowed")
	// ErrKeyPolicy is ErrAKPolicy for the certified TLS key.
	ErrKeyPolicy = errors.New("attest: TLS key authorization policy not allowed")
	// ErrCertifyQualifiedName means the certified object's qualified name is
	// malformed, equals its name, or is the qualified name of a primary or
	// external object of a hierarchy: the key is not a child key (of the
	// SRK) as the device SDK creates it.
	ErrCertifyQualifiedName = errors.New("attest: certified key is not under the expected hierarchy")
)
