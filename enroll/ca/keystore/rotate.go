package keystore

import (
	"crypto"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"

	"github.com/fleetgate/fleetgate/enroll/ca"
)

// Keys of the issuing CAs a rotation adds (ca.Options.NewKey and
// OpenKey). They live in the store of the configured key (ca_key, the
// base): a new PKCS#11 key on the same token, a new TPM key at the next
// free persistent handle. The data directory's issuer list records each
// new key by its place in the store alone, without the module, token,
// device or PIN: "pkcs11:object=issuing-…" or "tpm:handle=0x81…". These
// come from the base when the key is opened, so no PIN is ever written to
// the data directory. With a file base, keys are files in the data
// directory, as ca.NewFileKey makes them.

// maxTPMHandles bounds the search for a free persistent handle after the
// base's.
const maxTPMHandles = 64

// Rotation creates and opens the issuing keys of a CA in the store of
// base, and closes them all at Close. Safe for concurrent use.
type Rotation struct {
	base string
	mu   sync.Mutex
	keys []Key
}

// NewRotation returns the rotation keys for the configured key base.
func NewRotation(base string) *Rotation { return &Rotation{base: base} }

// NewKey creates a P-256 key for a new issuing CA called name in the
// base's store and returns it with the reference to record (ca.Options.NewKey).
func (r *Rotation) NewKey(dir, name string) (crypto.Signer, string, error) {
	var k Key
	var rec string
	var err error
	switch scheme(r.base) {
	case "pkcs11":
		rec = "pkcs11:object=" + url.PathEscape(name)
		var ref string
		if ref, err = r.resolve(rec); err == nil {
			k, err = generatePKCS11(ref)
		}
	case "tpm":
		k, rec, err = r.newTPMKey()
	default:
		return ca.NewFileKey(dir, name)
	}
	if err != nil {
		return nil, "", err
	}
	r.keep(k)
	return k, rec, nil
}

// OpenKey opens the key a rotation recorded as ref (ca.Options.OpenKey): a
// file relative to dir, or a key in the base's store.
func (r *Rotation) OpenKey(dir, ref string) (crypto.Signer, error) {
	if IsFile(ref) {
		return ca.FileKeys(dir, ref)
	}
	full, err := r.resolve(ref)
	if err != nil {
		return nil, err
	}
	k, err := Open(full)
	if err != nil {
		return nil, err
	}
	r.keep(k)
	return k, nil
}

// Close closes every key NewKey and OpenKey returned.
func (r *Rotation) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, k := range r.keys {
		errs = append(errs, k.Close())
	}
	r.keys = nil
	return errors.Join(errs...)
}

func (r *Rotation) keep(k Key) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.keys = append(r.keys, k)
}

// resolve makes the full reference of the recorded key rec: the base with
// the key's own attributes (object and id, or handle) replaced by rec's.
func (r *Rotation) resolve(rec string) (string, error) {
	s := scheme(rec)
	if s != scheme(r.base) {
		return "", fmt.Errorf("%w: %s key %s recorded for an issuing CA, but ca_key is a %s key (%s): configure the store the key is in",
			ErrBadRef, s, rec, scheme(r.base), Redact(r.base))
	}
	own := map[string]bool{"object": true, "id": true}
	sep := ";"
	if s == "tpm" {
		own = map[string]bool{"handle": true}
	}
	basePath, query, hasQuery := strings.Cut(r.base[len(s)+1:], "?")
	recPath, _, _ := strings.Cut(rec[len(s)+1:], "?")
	var attrs []string
	for _, kv := range strings.Split(basePath, sep) {
		k, _, _ := strings.Cut(kv, "=")
		if kv != "" && !own[k] {
			attrs = append(attrs, kv)
		}
	}
	for _, kv := range strings.Split(recPath, sep) {
		k, _, _ := strings.Cut(kv, "=")
		if !own[k] {
			return "", fmt.Errorf("%w: recorded key %s: attribute %q", ErrBadRef, rec, k)
		}
		attrs = append(attrs, kv)
	}
	full := s + ":" + strings.Join(attrs, sep)
	if hasQuery {
		full += "?" + query
	}
	return full, nil
}

// newTPMKey creates the key at the first free persistent handle after the
// base's.
func (r *Rotation) newTPMKey() (Key, string, error) {
	b, err := parseTPMRef(r.base)
	if err != nil {
		return nil, "", err
	}
	for h := b.handle + 1; h <= b.handle+maxTPMHandles && h <= 0x817FFFFF; h++ {
		rec := fmt.Sprintf("tpm:handle=0x%08x", uint32(h))
		ref, err := r.resolve(rec)
		if err != nil {
			return nil, "", err
		}
		k, err := generateTPM(ref)
		if errors.Is(err, ErrKeyExists) {
			continue
		}
		return k, rec, err
	}
	return nil, "", storeErr("tpm", r.base, ErrKeyExists, "no free persistent handle in the %d after the base's", maxTPMHandles)
}
