// Package keystore opens the private key of a CA as a crypto.Signer from a
// key reference, so that signing never needs the key in the server's
// memory when it lives in hardware:
//
//   - "file:PATH" (or a bare PATH): a PEM private key, which must not be
//     readable by group or others (0600). The default.
//   - "pkcs11:..." (RFC 7512): a key on a PKCS#11 token (an HSM, SoftHSM2),
//     through github.com/ThalesGroup/crypto11. The key must be sensitive
//     and not extractable; the PIN never appears in an error or a log.
//   - "tpm:handle=0x81...;device=/dev/tpmrm0": a persistent signing key in
//     the server's TPM 2.0 (go-tpm), created fixedTPM/fixedParent, so it
//     cannot leave the TPM.
//
// Open finds an existing key; Generate creates a new P-256 key in the store
// and returns it opened. Both fail with a message naming the store, the
// reference (PIN redacted) and what is wrong.
package keystore

import (
	"crypto"
	"errors"
	"fmt"
	"strings"
)

// Key is an opened CA key: a crypto.Signer whose Close releases the store
// (the PKCS#11 session, the TPM transport). Sign is safe for concurrent use.
type Key interface {
	crypto.Signer
	// Ref is the key reference with secrets redacted, for logs.
	Ref() string
	// Store is "file", "pkcs11" or "tpm".
	Store() string
	Close() error
}

// Errors callers may test with errors.Is.
var (
	// ErrBadRef: the key reference cannot be parsed.
	ErrBadRef = errors.New("keystore: bad key reference")
	// ErrNoKey: the store opened but holds no such key.
	ErrNoKey = errors.New("keystore: no such key")
	// ErrKeyExists: Generate would overwrite or shadow an existing key.
	ErrKeyExists = errors.New("keystore: key exists")
	// ErrInsecure: the key is readable by others, or exportable.
	ErrInsecure = errors.New("keystore: key not protected")
	// ErrStore: the store itself (module, token, PIN, TPM) is unusable.
	ErrStore = errors.New("keystore: key store unavailable")
)

// Open opens the key ref names.
func Open(ref string) (Key, error) {
	switch scheme(ref) {
	case "pkcs11":
		return openPKCS11(ref)
	case "tpm":
		return openTPM(ref)
	default:
		return openFile(ref)
	}
}

// Generate creates a new ECDSA P-256 key at ref and returns it opened. It
// refuses to replace an existing key.
func Generate(ref string) (Key, error) {
	switch scheme(ref) {
	case "pkcs11":
		return generatePKCS11(ref)
	case "tpm":
		return generateTPM(ref)
	default:
		return generateFile(ref)
	}
}

// Redact returns ref with any PIN replaced, safe for a log line.
func Redact(ref string) string {
	if scheme(ref) != "pkcs11" {
		return ref
	}
	u, err := parsePKCS11URI(ref)
	if err != nil {
		return "pkcs11:<unparsable, redacted>"
	}
	return u.redacted
}

// IsFile reports whether ref names a file key (the default store).
func IsFile(ref string) bool { s := scheme(ref); return s != "pkcs11" && s != "tpm" }

func scheme(ref string) string {
	if i := strings.IndexByte(ref, ':'); i > 0 {
		switch s := strings.ToLower(ref[:i]); s {
		case "file", "pkcs11", "tpm":
			return s
		}
	}
	return "file"
}

// scrub removes secret from err's text (a module might echo it).
type scrubbed struct {
	msg string
	err error
}

func (s *scrubbed) Error() string { return s.msg }
func (s *scrubbed) Unwrap() error { return s.err }

func scrub(err error, secret string) error {
	if err == nil || secret == "" || !strings.Contains(err.Error(), secret) {
		return err
	}
	return &scrubbed{msg: strings.ReplaceAll(err.Error(), secret, "<redacted>"), err: errors.Unwrap(err)}
}

func storeErr(store, ref string, kind error, format string, args ...any) error {
	return fmt.Errorf("%w: %s key %s: %s", kind, store, ref, fmt.Sprintf(format, args...))
}
