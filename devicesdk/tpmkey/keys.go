package tpmkey

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// State file names inside the key state directory. Each holds a TPM2B
// structure exactly as go-tpm marshals it (2-byte size prefix).
const (
	AKPublicFile   = "ak.pub"   // TPM2B_PUBLIC
	AKPrivateFile  = "ak.priv"  // TPM2B_PRIVATE, encrypted by the SRK
	TLSPublicFile  = "tls.pub"  // TPM2B_PUBLIC
	TLSPrivateFile = "tls.priv" // TPM2B_PRIVATE, encrypted by the SRK
)

// srkTemplate is the parent of the AK and the TLS key: the TCG ECC P-256 SRK
// template in the owner hierarchy (TCG TPM v2.0 Provisioning Guidance,
// 7.5.1). The same template always yields the same key, so it is recreated
// instead of persisted.
var srkTemplate = tpm2.ECCSRKTemplate

// eccSigningTemplate returns an ECC P-256 signing key template whose private
// part is generated in, and can never leave, the TPM (fixedTPM, fixedParent,
// sensitiveDataOrigin). A restricted key (the AK) only signs TPM-generated
// structures and carries the ECDSA-SHA256 scheme; the non-restricted TLS key
// has the NULL scheme, so each TPM2_Sign names its hash.
func eccSigningTemplate(restricted bool) tpm2.TPMTPublic {
	scheme := tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull}
	if restricted {
		scheme = tpm2.TPMTECCScheme{
			Scheme:  tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
		}
	}
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			Restricted:          restricted,
			SignEncrypt:         true,
		},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    scheme,
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// AKTemplate returns the template of the attestation key: ECC P-256,
// restricted, signing, ECDSA-SHA256.
func AKTemplate() tpm2.TPMTPublic { return eccSigningTemplate(true) }

// TLSKeyTemplate returns the template of the TLS client key: ECC P-256,
// non-restricted, signing.
func TLSKeyTemplate() tpm2.TPMTPublic { return eccSigningTemplate(false) }

// keyBlob is one TPM-wrapped key: the public area as the TPM returned it and
// the private area encrypted by the SRK.
type keyBlob struct {
	pub2B  []byte // TPM2B_PUBLIC, marshalled
	priv2B []byte // TPM2B_PRIVATE, marshalled
	public tpm2.TPM2BPublic
	priv   tpm2.TPM2BPrivate
	tpub   *tpm2.TPMTPublic
	name   []byte
}

func decodeBlob(pub2B, priv2B []byte) (*keyBlob, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2B)
	if err != nil {
		return nil, fmt.Errorf("decode TPM2B_PUBLIC: %w", err)
	}
	if len(pub2B) != 2+len(pub.Bytes()) {
		return nil, errors.New("decode TPM2B_PUBLIC: trailing data")
	}
	tpub, err := pub.Contents()
	if err != nil {
		return nil, fmt.Errorf("decode TPMT_PUBLIC: %w", err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](priv2B)
	if err != nil {
		return nil, fmt.Errorf("decode TPM2B_PRIVATE: %w", err)
	}
	if len(priv2B) != 2+len(priv.Buffer) || len(priv.Buffer) == 0 {
		return nil, errors.New("decode TPM2B_PRIVATE: bad length")
	}
	name, err := tpm2.ObjectName(tpub)
	if err != nil {
		return nil, fmt.Errorf("object name: %w", err)
	}
	return &keyBlob{pub2B: pub2B, priv2B: priv2B, public: *pub, priv: *priv, tpub: tpub, name: name.Buffer}, nil
}

// Keys are the device's AK and TLS key, resident in one TPM, plus the EK they
// are attested with. Methods are safe for concurrent use.
type Keys struct {
	tpm    *TPM
	ek     *EK
	ak     *keyBlob
	tls    *keyBlob
	tlsPub *ecdsa.PublicKey
}

// KeyOption configures LoadOrCreateKeys.
type KeyOption func(*keyOptions)

type keyOptions struct{ ek *EK }

// WithEK selects the EK used for credential activation and reported in the
// attestation, instead of the preferred one (TPM.EK).
func WithEK(ek *EK) KeyOption { return func(o *keyOptions) { o.ek = ek } }

// LoadOrCreateKeys loads the AK and TLS key blobs from stateDir into the TPM,
// or creates them (in the TPM) and stores their blobs, mode 0600, if stateDir
// holds none. A key whose blobs are only half present is an ErrKeyState.
// Blobs from another TPM fail to load.
func (t *TPM) LoadOrCreateKeys(stateDir string, opts ...KeyOption) (*Keys, error) {
	var o keyOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.ek == nil {
		ek, err := t.EK()
		if err != nil {
			return nil, err
		}
		o.ek = ek
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("tpmkey: create state dir: %w", err)
	}
	k := &Keys{tpm: t, ek: o.ek}
	err := t.do(func(tr transport.TPM) error {
		return withSRK(tr, func(srk *tpm2.CreatePrimaryResponse) error {
			var err error
			if k.ak, err = loadOrCreate(tr, srk, stateDir, AKPublicFile, AKPrivateFile, AKTemplate()); err != nil {
				return fmt.Errorf("tpmkey: AK: %w", err)
			}
			if k.tls, err = loadOrCreate(tr, srk, stateDir, TLSPublicFile, TLSPrivateFile, TLSKeyTemplate()); err != nil {
				return fmt.Errorf("tpmkey: TLS key: %w", err)
			}
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	pub, err := tpm2.Pub(*k.tls.tpub)
	if err != nil {
		return nil, fmt.Errorf("tpmkey: TLS public key: %w: %w", ErrKeyState, err)
	}
	ecPub, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("tpmkey: TLS public key is %T: %w", pub, ErrKeyState)
	}
	k.tlsPub = ecPub
	return k, nil
}

// withSRK creates the SRK, runs f, and flushes the SRK.
func withSRK(tr transport.TPM, f func(srk *tpm2.CreatePrimaryResponse) error) error {
	srk, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(srkTemplate),
	}.Execute(tr)
	if err != nil {
		return fmt.Errorf("tpmkey: tpm2.CreatePrimary(SRK): %w", err)
	}
	defer flush(tr, srk.ObjectHandle)
	return f(srk)
}

func srkAuth(srk *tpm2.CreatePrimaryResponse) tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}
}

func loadOrCreate(tr transport.TPM, srk *tpm2.CreatePrimaryResponse, dir, pubFile, privFile string, tmpl tpm2.TPMTPublic) (*keyBlob, error) {
	pubPath, privPath := filepath.Join(dir, pubFile), filepath.Join(dir, privFile)
	pub2B, pubErr := os.ReadFile(pubPath)
	priv2B, privErr := os.ReadFile(privPath)
	switch {
	case pubErr == nil && privErr == nil:
		b, err := decodeBlob(pub2B, priv2B)
		if err != nil {
			return nil, fmt.Errorf("%s: %w: %w", dir, ErrKeyState, err)
		}
		// Loading proves the blob was wrapped by this TPM's SRK.
		h, err := loadBlob(tr, srk, b)
		if err != nil {
			return nil, err
		}
		flush(tr, h)
		return b, nil
	case errors.Is(pubErr, os.ErrNotExist) && errors.Is(privErr, os.ErrNotExist):
		rsp, err := tpm2.Create{
			ParentHandle: srkAuth(srk),
			InPublic:     tpm2.New2B(tmpl),
		}.Execute(tr)
		if err != nil {
			return nil, fmt.Errorf("tpm2.Create: %w", err)
		}
		b, err := decodeBlob(tpm2.Marshal(rsp.OutPublic), tpm2.Marshal(rsp.OutPrivate))
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrMalformedResponse, err)
		}
		// Private first: a public file alone is detected as half state.
		if err := writeFileAtomic(privPath, b.priv2B); err != nil {
			return nil, err
		}
		if err := writeFileAtomic(pubPath, b.pub2B); err != nil {
			return nil, err
		}
		return b, nil
	case pubErr != nil && !errors.Is(pubErr, os.ErrNotExist):
		return nil, fmt.Errorf("read %s: %w", pubPath, pubErr)
	case privErr != nil && !errors.Is(privErr, os.ErrNotExist):
		return nil, fmt.Errorf("read %s: %w", privPath, privErr)
	default:
		return nil, fmt.Errorf("%s: only one of %s, %s present: %w", dir, pubFile, privFile, ErrKeyState)
	}
}

// loadBlob loads a key under the SRK and checks the TPM's name for it.
func loadBlob(tr transport.TPM, srk *tpm2.CreatePrimaryResponse, b *keyBlob) (tpm2.TPMHandle, error) {
	rsp, err := tpm2.Load{
		ParentHandle: srkAuth(srk),
		InPrivate:    b.priv,
		InPublic:     b.public,
	}.Execute(tr)
	if err != nil {
		return 0, fmt.Errorf("tpm2.Load: %w: %w", ErrKeyLoad, err)
	}
	if !bytes.Equal(rsp.Name.Buffer, b.name) {
		flush(tr, rsp.ObjectHandle)
		return 0, ErrKeyMismatch
	}
	return rsp.ObjectHandle, nil
}

// withKeys loads the given keys under a fresh SRK, flushes the SRK (a TPM
// has few object slots), runs f with their handles, and flushes them.
func withKeys(tr transport.TPM, blobs []*keyBlob, f func(hs []tpm2.AuthHandle) error) error {
	var hs []tpm2.AuthHandle
	defer func() {
		for _, h := range hs {
			flush(tr, h.Handle)
		}
	}()
	err := withSRK(tr, func(srk *tpm2.CreatePrimaryResponse) error {
		for _, b := range blobs {
			h, err := loadBlob(tr, srk, b)
			if err != nil {
				return err
			}
			hs = append(hs, tpm2.AuthHandle{Handle: h, Name: tpm2.TPM2BName{Buffer: b.name}, Auth: tpm2.PasswordAuth(nil)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	return f(hs)
}

// EK returns the EK these keys are attested with.
func (k *Keys) EK() *EK { return k.ek }

// AKPublic returns the AK's public area as TPM2B_PUBLIC bytes.
func (k *Keys) AKPublic() []byte { return bytes.Clone(k.ak.pub2B) }

// AKName returns the AK's TPM name.
func (k *Keys) AKName() []byte { return bytes.Clone(k.ak.name) }

// TLSPublic returns the TLS key's public area as TPM2B_PUBLIC bytes.
func (k *Keys) TLSPublic() []byte { return bytes.Clone(k.tls.pub2B) }

// TLSPublicKey returns the TLS key's public key.
func (k *Keys) TLSPublicKey() *ecdsa.PublicKey { return k.tlsPub }

// Signer returns the TLS key as a crypto.Signer for crypto/tls and
// x509.CreateCertificateRequest.
func (k *Keys) Signer() crypto.Signer { return &Signer{keys: k} }

// writeFileAtomic writes data with mode 0600 via a temporary file and a
// rename, so a crash never leaves a truncated blob.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", path, err)
	}
	return nil
}
