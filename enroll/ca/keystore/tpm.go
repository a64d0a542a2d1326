package keystore

import (
	"crypto"
	"crypto/rand"
	"encoding/asn1"
	"fmt"
	"io"
	"math/big"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// DefaultTPMDevice is the kernel's TPM resource manager.
const DefaultTPMDevice = "/dev/tpmrm0"

// tpmRef is "tpm:handle=0x81000100;device=/dev/tpmrm0" (device may be
// swtpm's unix socket).
type tpmRef struct {
	handle tpm2.TPMHandle
	device string
}

func parseTPMRef(ref string) (*tpmRef, error) {
	r := &tpmRef{device: DefaultTPMDevice}
	body := ref[len("tpm:"):]
	for _, kv := range strings.Split(body, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("%w: %s: attribute %q has no '='", ErrBadRef, ref, kv)
		}
		switch k {
		case "handle":
			n, err := strconv.ParseUint(v, 0, 32)
			if err != nil {
				return nil, fmt.Errorf("%w: %s: handle %q is not a number", ErrBadRef, ref, v)
			}
			r.handle = tpm2.TPMHandle(n)
		case "device":
			r.device = v
		default:
			return nil, fmt.Errorf("%w: %s: unknown attribute %q (handle, device)", ErrBadRef, ref, k)
		}
	}
	// Persistent owner-hierarchy handles (TCG handle registry).
	if r.handle < 0x81000000 || r.handle > 0x817FFFFF {
		return nil, fmt.Errorf("%w: %s: handle must be a persistent owner handle 0x81000000..0x817FFFFF", ErrBadRef, ref)
	}
	return r, nil
}

// tpmKey is a persistent ECDSA key in a TPM. Commands are serialised: a
// TPM transport is not safe for concurrent use.
type tpmKey struct {
	mu  sync.Mutex
	tr  transport.TPMCloser
	h   tpm2.AuthHandle
	pub crypto.PublicKey
	ref string
}

func (k *tpmKey) Public() crypto.PublicKey { return k.pub }
func (k *tpmKey) Ref() string              { return k.ref }
func (k *tpmKey) Store() string            { return "tpm" }

func (k *tpmKey) Close() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.tr == nil {
		return nil
	}
	err := k.tr.Close()
	k.tr = nil
	return err
}

// Sign signs a digest made with opts.HashFunc() by TPM2_Sign; the result is
// an ASN.1 ECDSA-Sig-Value as crypto/ecdsa returns.
func (k *tpmKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	var alg tpm2.TPMIAlgHash
	switch opts.HashFunc() {
	case crypto.SHA256:
		alg = tpm2.TPMAlgSHA256
	case crypto.SHA384:
		alg = tpm2.TPMAlgSHA384
	case crypto.SHA512:
		alg = tpm2.TPMAlgSHA512
	default:
		return nil, fmt.Errorf("tpm key %s: unsupported hash %v", k.ref, opts.HashFunc())
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.tr == nil {
		return nil, fmt.Errorf("tpm key %s: closed", k.ref)
	}
	rsp, err := tpm2.Sign{
		KeyHandle: k.h,
		Digest:    tpm2.TPM2BDigest{Buffer: digest},
		InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: alg})},
		// Not a restricted key: a NULL ticket.
		Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
	}.Execute(k.tr)
	if err != nil {
		return nil, fmt.Errorf("tpm key %s: TPM2_Sign: %w", k.ref, err)
	}
	sig, err := rsp.Signature.Signature.ECDSA()
	if err != nil {
		return nil, fmt.Errorf("tpm key %s: TPM2_Sign: %w", k.ref, err)
	}
	return asn1.Marshal(struct{ R, S *big.Int }{
		new(big.Int).SetBytes(sig.SignatureR.Buffer), new(big.Int).SetBytes(sig.SignatureS.Buffer)})
}

func openTPMTransport(r *tpmRef, ref string) (transport.TPMCloser, error) {
	fi, err := os.Stat(r.device)
	if err != nil {
		return nil, storeErr("tpm", ref, ErrStore, "no TPM at %s: %v", r.device, err)
	}
	var tr transport.TPMCloser
	if fi.Mode()&os.ModeSocket != 0 {
		tr, err = linuxudstpm.Open(r.device)
	} else {
		tr, err = linuxtpm.Open(r.device)
	}
	if err != nil {
		return nil, storeErr("tpm", ref, ErrStore, "open TPM %s: %v", r.device, err)
	}
	// A TPM that does not answer is found now, not at the first signature.
	if _, err := (tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTManufacturer), PropertyCount: 1}).Execute(tr); err != nil {
		tr.Close()
		return nil, storeErr("tpm", ref, ErrStore, "TPM %s does not answer: %v", r.device, err)
	}
	return tr, nil
}

// signingTemplate is an unrestricted ECDSA P-256 signing key that cannot
// leave the TPM (fixedTPM, fixedParent) and was created inside it
// (sensitiveDataOrigin). unique makes each generated key a new one.
func signingTemplate(unique []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, SignEncrypt: true, NoDA: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: unique}, Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}}),
	}
}

func openTPM(ref string) (Key, error) {
	r, err := parseTPMRef(ref)
	if err != nil {
		return nil, err
	}
	tr, err := openTPMTransport(r, ref)
	if err != nil {
		return nil, err
	}
	k, err := loadTPMKey(tr, r, ref)
	if err != nil {
		tr.Close()
		return nil, err
	}
	return k, nil
}

func loadTPMKey(tr transport.TPMCloser, r *tpmRef, ref string) (*tpmKey, error) {
	rp, err := tpm2.ReadPublic{ObjectHandle: r.handle}.Execute(tr)
	if err != nil {
		return nil, storeErr("tpm", ref, ErrNoKey, "no persistent key at handle 0x%08x: %v", uint32(r.handle), err)
	}
	pubArea, err := rp.OutPublic.Contents()
	if err != nil {
		return nil, storeErr("tpm", ref, ErrStore, "public area: %v", err)
	}
	a := pubArea.ObjectAttributes
	if !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin {
		return nil, storeErr("tpm", ref, ErrInsecure, "the key at 0x%08x may be duplicated out of the TPM or was imported (needs fixedTPM, fixedParent, sensitiveDataOrigin)", uint32(r.handle))
	}
	if !a.SignEncrypt || a.Restricted || a.Decrypt || pubArea.Type != tpm2.TPMAlgECC {
		return nil, storeErr("tpm", ref, ErrNoKey, "the key at 0x%08x is not an unrestricted ECDSA signing key", uint32(r.handle))
	}
	pub, err := tpm2.Pub(*pubArea)
	if err != nil {
		return nil, storeErr("tpm", ref, ErrStore, "public key: %v", err)
	}
	return &tpmKey{tr: tr, pub: pub, ref: ref,
		h: tpm2.AuthHandle{Handle: r.handle, Name: rp.Name, Auth: tpm2.PasswordAuth(nil)}}, nil
}

func generateTPM(ref string) (Key, error) {
	r, err := parseTPMRef(ref)
	if err != nil {
		return nil, err
	}
	tr, err := openTPMTransport(r, ref)
	if err != nil {
		return nil, err
	}
	if _, err := (tpm2.ReadPublic{ObjectHandle: r.handle}).Execute(tr); err == nil {
		tr.Close()
		return nil, storeErr("tpm", ref, ErrKeyExists, "handle 0x%08x holds a key; it is never replaced", uint32(r.handle))
	}
	unique := make([]byte, 32)
	if _, err := rand.Read(unique); err != nil {
		tr.Close()
		return nil, err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(signingTemplate(unique)),
	}.Execute(tr)
	if err != nil {
		tr.Close()
		return nil, storeErr("tpm", ref, ErrStore, "TPM2_CreatePrimary: %v", err)
	}
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: r.handle,
	}.Execute(tr)
	_, _ = tpm2.FlushContext{FlushHandle: cp.ObjectHandle}.Execute(tr)
	if err != nil {
		tr.Close()
		return nil, storeErr("tpm", ref, ErrStore, "TPM2_EvictControl to 0x%08x: %v", uint32(r.handle), err)
	}
	k, err := loadTPMKey(tr, r, ref)
	if err != nil {
		tr.Close()
		return nil, err
	}
	return k, nil
}
