package tpmkey_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testpki"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// device is one simulated device: a swtpm and its opened TPM.
type device struct {
	inst  *swtpm.Instance
	tpm   *tpmkey.TPM
	state string
}

func newDevice(t *testing.T, m *swtpm.Manufacturer) *device {
	t.Helper()
	inst, tpm := swtpm.DeviceForTest(t, m)
	// A directory LoadOrCreateKeys creates itself.
	return &device{inst: inst, tpm: tpm, state: filepath.Join(t.TempDir(), "keys")}
}

func (d *device) keys(t *testing.T) *tpmkey.Keys {
	t.Helper()
	k, err := d.tpm.LoadOrCreateKeys(d.state)
	if err != nil {
		t.Fatalf("LoadOrCreateKeys: %v", err)
	}
	return k
}

func TestEKs(t *testing.T) {
	t.Parallel()
	d := newDevice(t, swtpm.ManufacturerForTest(t))
	eks, err := d.tpm.EKs()
	if err != nil {
		t.Fatalf("EKs: %v", err)
	}
	// swtpm_setup also persists its EKs; the EK recreated from the
	// template must be that very object.
	persistent := map[tpm2.TPMHandle]tpm2.TPMHandle{
		tpmkey.NVIndexRSA2048EKCert: 0x81010001,
		tpmkey.NVIndexECCP384EKCert: 0x81010016,
	}
	tr, err := linuxudstpm.Open(d.inst.SocketPath())
	if err != nil {
		t.Fatalf("linuxudstpm.Open: %v", err)
	}
	defer tr.Close()
	var got []tpm2.TPMHandle
	for _, ek := range eks {
		got = append(got, ek.NVIndex)
		rp, err := tpm2.ReadPublic{ObjectHandle: persistent[ek.NVIndex]}.Execute(tr)
		if err != nil {
			t.Fatalf("ReadPublic(%#x): %v", uint32(persistent[ek.NVIndex]), err)
		}
		if !bytes.Equal(rp.Name.Buffer, ek.Name) {
			t.Errorf("EK from NV %#x: name %x, persistent EK name %x", uint32(ek.NVIndex), ek.Name, rp.Name.Buffer)
		}
	}
	want := []tpm2.TPMHandle{tpmkey.NVIndexRSA2048EKCert, tpmkey.NVIndexECCP384EKCert}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("EK NV indices = %#x, want %#x", got, want)
	}
	ek, err := d.tpm.EK()
	if err != nil {
		t.Fatalf("EK: %v", err)
	}
	if ek.NVIndex != tpmkey.NVIndexRSA2048EKCert {
		t.Errorf("preferred EK is %#x, want the RSA one", uint32(ek.NVIndex))
	}
	if _, err := x509.ParseCertificate(ek.CertDER); err != nil {
		t.Errorf("CertDER does not parse on its own (padding left?): %v", err)
	}
}

func TestKeysSurviveARebootAndReopen(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	dir := t.TempDir()
	state := t.TempDir()
	inst := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir, Manufacturer: m})
	tpm, err := tpmkey.Open(inst.SocketPath())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	k1, err := tpm.LoadOrCreateKeys(state)
	if err != nil {
		t.Fatalf("LoadOrCreateKeys: %v", err)
	}
	if err := tpm.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := inst.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}

	inst2 := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir})
	tpm2 := swtpm.OpenForTest(t, inst2)
	k2, err := tpm2.LoadOrCreateKeys(state)
	if err != nil {
		t.Fatalf("LoadOrCreateKeys after reboot: %v", err)
	}
	if !bytes.Equal(k1.TLSPublic(), k2.TLSPublic()) || !bytes.Equal(k1.AKPublic(), k2.AKPublic()) {
		t.Fatal("keys changed across reboot")
	}
	if !k1.TLSPublicKey().Equal(k2.Signer().Public()) {
		t.Fatal("signer public key changed across reboot")
	}
	digest := sha256.Sum256([]byte("after reboot"))
	sig, err := k2.Signer().Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if !ecdsa.VerifyASN1(k1.TLSPublicKey(), digest[:], sig) {
		t.Error("signature after reboot does not verify with the original public key")
	}
}

func TestStateDirHoldsOnlyWrappedKeys(t *testing.T) {
	t.Parallel()
	d := newDevice(t, swtpm.ManufacturerForTest(t))
	d.keys(t)
	fi, err := os.Stat(d.state)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		t.Errorf("state dir mode %o is accessible to others", perm)
	}
	entries, err := os.ReadDir(d.state)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{tpmkey.AKPublicFile: true, tpmkey.AKPrivateFile: true, tpmkey.TLSPublicFile: true, tpmkey.TLSPrivateFile: true}
	if len(entries) != len(want) {
		t.Errorf("state dir holds %d files, want %d", len(entries), len(want))
	}
	for _, e := range entries {
		name := e.Name()
		if !want[name] {
			t.Errorf("unexpected file %s", name)
			continue
		}
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		if perm := info.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s mode = %o, want 600", name, perm)
		}
		data, err := os.ReadFile(filepath.Join(d.state, name))
		if err != nil {
			t.Fatal(err)
		}
		testpki.NoPrivateKey(t, name, data)
		switch name {
		case tpmkey.AKPrivateFile, tpmkey.TLSPrivateFile:
			priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](data)
			if err != nil || len(priv.Buffer) == 0 || len(data) != 2+len(priv.Buffer) {
				t.Errorf("%s is not a TPM2B_PRIVATE: %v", name, err)
			}
		default:
			pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](data)
			if err != nil {
				t.Errorf("%s is not a TPM2B_PUBLIC: %v", name, err)
				continue
			}
			if _, err := pub.Contents(); err != nil {
				t.Errorf("%s holds no TPMT_PUBLIC: %v", name, err)
			}
		}
	}
}

func TestKeyStateErrors(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	a := newDevice(t, m)
	b := newDevice(t, m)
	a.keys(t)

	tests := []struct {
		name  string
		tpm   *tpmkey.TPM
		state func(t *testing.T) string
		want  error
	}{
		{
			name: "Keys of another TPM are refused",
			tpm:  b.tpm,
			state: func(t *testing.T) string {
				return copyDir(t, a.state)
			},
			want: tpmkey.ErrKeyLoad,
		},
		{
			name: "A key with only its public half is refused",
			tpm:  a.tpm,
			state: func(t *testing.T) string {
				dir := copyDir(t, a.state)
				os.Remove(filepath.Join(dir, tpmkey.TLSPrivateFile))
				return dir
			},
			want: tpmkey.ErrKeyState,
		},
		{
			name: "A truncated public blob is refused",
			tpm:  a.tpm,
			state: func(t *testing.T) string {
				dir := copyDir(t, a.state)
				p := filepath.Join(dir, tpmkey.AKPublicFile)
				data, _ := os.ReadFile(p)
				os.WriteFile(p, data[:len(data)/2], 0o600)
				return dir
			},
			want: tpmkey.ErrKeyState,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.tpm.LoadOrCreateKeys(tc.state(t))
			if !errors.Is(err, tc.want) {
				t.Fatalf("LoadOrCreateKeys: err = %v, want %v", err, tc.want)
			}
		})
	}
}

func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestSigner(t *testing.T) {
	t.Parallel()
	d := newDevice(t, swtpm.ManufacturerForTest(t))
	k := d.keys(t)
	s := k.Signer()
	pub, ok := s.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("Public() = %T, want a P-256 *ecdsa.PublicKey", s.Public())
	}

	t.Run("Signatures verify with crypto/ecdsa for every supported hash", func(t *testing.T) {
		msg := []byte("hello")
		for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
			hh := h.New()
			hh.Write(msg)
			digest := hh.Sum(nil)
			sig, err := s.Sign(rand.Reader, digest, h)
			if err != nil {
				t.Fatalf("Sign(%v): %v", h, err)
			}
			if !ecdsa.VerifyASN1(pub, digest, sig) {
				t.Errorf("Sign(%v) does not verify", h)
			}
		}
	})
	t.Run("Unsupported hashes and wrong digest sizes are refused", func(t *testing.T) {
		d384 := sha512.Sum384([]byte("x"))
		for _, tc := range []struct {
			digest []byte
			opts   crypto.SignerOpts
		}{
			{d384[:], crypto.SHA256},
			{make([]byte, 20), crypto.SHA1},
			{make([]byte, 32), crypto.Hash(0)},
		} {
			if _, err := s.Sign(rand.Reader, tc.digest, tc.opts); !errors.Is(err, tpmkey.ErrUnsupportedHash) {
				t.Errorf("Sign(%v, %d bytes): err = %v, want ErrUnsupportedHash", tc.opts, len(tc.digest), err)
			}
		}
	})
	t.Run("A CSR signed in the TPM verifies", func(t *testing.T) {
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
			Subject: pkix.Name{CommonName: "device-1"},
		}, s)
		if err != nil {
			t.Fatalf("CreateCertificateRequest: %v", err)
		}
		csr, err := x509.ParseCertificateRequest(der)
		if err != nil {
			t.Fatal(err)
		}
		if err := csr.CheckSignature(); err != nil {
			t.Errorf("CSR signature: %v", err)
		}
		if !pub.Equal(csr.PublicKey) {
			t.Error("CSR key is not the TPM key")
		}
	})
	t.Run("Concurrent signing is serialised", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := range 8 {
			wg.Go(func() {
				digest := sha256.Sum256([]byte{byte(i)})
				sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
				if err != nil {
					t.Errorf("Sign: %v", err)
					return
				}
				if !ecdsa.VerifyASN1(pub, digest[:], sig) {
					t.Error("concurrent signature does not verify")
				}
			})
		}
		wg.Wait()
	})
	t.Run("A TLS 1.3 handshake authenticates with the TPM key", func(t *testing.T) {
		testpki.TLSHandshake(t, s)
	})
}

func TestOpenAndClose(t *testing.T) {
	t.Parallel()
	t.Run("A regular file is not a TPM", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "file")
		os.WriteFile(p, nil, 0o600)
		if _, err := tpmkey.Open(p); !errors.Is(err, tpmkey.ErrUnsupportedPath) {
			t.Fatalf("err = %v, want ErrUnsupportedPath", err)
		}
	})
	t.Run("A missing path fails", func(t *testing.T) {
		if _, err := tpmkey.Open(filepath.Join(t.TempDir(), "nope")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("err = %v, want ErrNotExist", err)
		}
	})
	t.Run("A closed TPM refuses commands", func(t *testing.T) {
		d := newDevice(t, swtpm.ManufacturerForTest(t))
		if err := d.tpm.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := d.tpm.Close(); !errors.Is(err, tpmkey.ErrClosed) {
			t.Errorf("second Close: err = %v, want ErrClosed", err)
		}
		if _, err := d.tpm.EKs(); !errors.Is(err, tpmkey.ErrClosed) {
			t.Errorf("EKs after Close: err = %v, want ErrClosed", err)
		}
	})
}
