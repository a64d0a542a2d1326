package tpmkey

import "errors"

// Sentinel errors returned (wrapped) by this package. Test with errors.Is.
var (
	// ErrUnsupportedPath means Open was given a path that is neither a unix
	// socket (swtpm) nor a character device (/dev/tpmrm0).
	ErrUnsupportedPath = errors.New("tpmkey: path is neither a unix socket nor a TPM device")
	// ErrClosed means the TPM was used after Close.
	ErrClosed = errors.New("tpmkey: TPM closed")
	// ErrNoEKCertificate means the TPM holds no EK certificate in any of
	// the NV indices this package knows.
	ErrNoEKCertificate = errors.New("tpmkey: no EK certificate in NV")
	// ErrUnsupportedEK means an EK certificate holds a key type for which
	// no standard EK template is known here.
	ErrUnsupportedEK = errors.New("tpmkey: unsupported EK key type")
	// ErrEKMismatch means the EK recreated from the standard template is
	// not the key in the EK certificate.
	ErrEKMismatch = errors.New("tpmkey: recreated EK does not match its certificate")
	// ErrKeyState means the key state directory is inconsistent or its
	// files do not decode as TPM2B_PUBLIC / TPM2B_PRIVATE.
	ErrKeyState = errors.New("tpmkey: key state invalid")
	// ErrKeyLoad means the TPM refused to load a stored key blob: it was
	// wrapped by another TPM's SRK (or the TPM was cleared), or altered.
	ErrKeyLoad = errors.New("tpmkey: TPM refused the stored key")
	// ErrKeyMismatch means the TPM loaded a key whose name differs from the
	// stored public area (the blobs belong to another TPM or were swapped).
	ErrKeyMismatch = errors.New("tpmkey: loaded key does not match stored public area")
	// ErrUnsupportedHash means Sign was asked for a hash other than
	// SHA-256, SHA-384 or SHA-512, or the digest length does not match.
	ErrUnsupportedHash = errors.New("tpmkey: unsupported hash for signing")
	// ErrActivation means TPM2_ActivateCredential refused the credential,
	// e.g. because it was made for another TPM's EK or another AK.
	ErrActivation = errors.New("tpmkey: credential activation failed")
	// ErrMalformedResponse means the TPM returned a structure that does
	// not decode as expected.
	ErrMalformedResponse = errors.New("tpmkey: malformed TPM response")
)
