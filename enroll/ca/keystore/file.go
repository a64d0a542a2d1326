package keystore

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/fleetgate/fleetgate/enroll/ca"
)

// fileKey is a PEM key held in memory.
type fileKey struct {
	crypto.Signer
	path string
}

func (k *fileKey) Ref() string   { return "file:" + k.path }
func (k *fileKey) Store() string { return "file" }
func (k *fileKey) Close() error  { return nil }

func filePath(ref string) string {
	if len(ref) > 5 && strings.EqualFold(ref[:5], "file:") {
		return ref[5:]
	}
	return ref
}

func openFile(ref string) (Key, error) {
	path := filePath(ref)
	if path == "" {
		return nil, fmt.Errorf("%w: empty file path", ErrBadRef)
	}
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, storeErr("file", path, ErrNoKey, "does not exist")
	}
	if err != nil {
		return nil, storeErr("file", path, ErrStore, "%v", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, storeErr("file", path, ErrInsecure, "mode %04o lets group or others read it; chmod 600 %s", perm, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, storeErr("file", path, ErrStore, "%v", err)
	}
	s, err := ca.ParseKeyPEM(b)
	if err != nil {
		return nil, storeErr("file", path, ErrNoKey, "%v", err)
	}
	return &fileKey{Signer: s, path: path}, nil
}

func generateFile(ref string) (Key, error) {
	path := filePath(ref)
	if path == "" {
		return nil, fmt.Errorf("%w: empty file path", ErrBadRef)
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	keyPEM, err := ca.KeyPEM(k)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, storeErr("file", path, ErrStore, "%v", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return nil, storeErr("file", path, ErrKeyExists, "exists; it is never overwritten")
	}
	if err != nil {
		return nil, storeErr("file", path, ErrStore, "%v", err)
	}
	_, err = f.Write(keyPEM)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, storeErr("file", path, ErrStore, "%v", err)
	}
	return &fileKey{Signer: k, path: path}, nil
}

// InMemory returns the key (ca.InMemory: certificates it signs are not
// verified again after signing).
func (k *fileKey) InMemory() crypto.Signer { return k.Signer }
