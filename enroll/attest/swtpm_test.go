package attest_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testpki"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// device is a simulated device: its own swtpm, the opened TPM and its keys.
type device struct {
	inst  *swtpm.Instance
	tpm   *tpmkey.TPM
	keys  *tpmkey.Keys
	state string
}

func newDevice(t *testing.T, m *swtpm.Manufacturer, opts ...func(*tpmkey.TPM) tpmkey.KeyOption) *device {
	t.Helper()
	d := &device{state: filepath.Join(t.TempDir(), "keys")}
	d.inst, d.tpm = swtpm.DeviceForTest(t, m)
	var err error
	var kopts []tpmkey.KeyOption
	for _, o := range opts {
		kopts = append(kopts, o(d.tpm))
	}
	if d.keys, err = d.tpm.LoadOrCreateKeys(d.state, kopts...); err != nil {
		t.Fatalf("LoadOrCreateKeys: %v", err)
	}
	return d
}

func nonce(t *testing.T) []byte {
	t.Helper()
	n := make([]byte, 32)
	if _, err := rand.Read(n); err != nil {
		t.Fatal(err)
	}
	return n
}

// roundTrip sends v through JSON into a fresh *T, as the HTTP API does.
func roundTrip[T any](t *testing.T, v T) T {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var out T
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestEnrollmentFlow walks the whole TPM enrollment in-process, through the
// wire types, for the RSA and the ECC EK of a real swtpm.
func TestEnrollmentFlow(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	for _, tc := range []struct {
		name  string
		index tpm2.TPMHandle
	}{
		{"A device with an RSA 2048 EK enrolls", tpmkey.NVIndexRSA2048EKCert},
		{"A device with an ECC P-384 EK enrolls", tpmkey.NVIndexECCP384EKCert},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newDevice(t, m, func(tpm *tpmkey.TPM) tpmkey.KeyOption {
				eks, err := tpm.EKs()
				if err != nil {
					t.Fatalf("EKs: %v", err)
				}
				for _, ek := range eks {
					if ek.NVIndex == tc.index {
						return tpmkey.WithEK(ek)
					}
				}
				t.Fatalf("no EK at %#x", uint32(tc.index))
				return nil
			})

			// Round 1, device.
			req1 := roundTrip(t, api.TPMChallengeRequest{DeviceID: "dev-1", EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()})

			// Round 1, server: chain, then the AK, then the challenge.
			ekCert, err := attest.VerifyEKCertificate(req1.EKCert, m.RootPool(), time.Now())
			if err != nil {
				t.Fatalf("VerifyEKCertificate: %v", err)
			}
			ekPub, err := attest.EKPublicFromCert(ekCert)
			if err != nil {
				t.Fatalf("EKPublicFromCert: %v", err)
			}
			if n, _ := attest.Name(ekPub); !bytes.Equal(n, d.keys.EK().Name) {
				t.Fatalf("server EK name %x, TPM EK name %x", n, d.keys.EK().Name)
			}
			akPub, err := attest.VerifyAKPublic(req1.AKPublic)
			if err != nil {
				t.Fatalf("VerifyAKPublic: %v", err)
			}
			akName, err := attest.Name(akPub)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(akName, d.keys.AKName()) {
				t.Fatalf("server AK name %x, TPM AK name %x", akName, d.keys.AKName())
			}
			credBlob, encSecret, secret, err := attest.MakeCredential(rand.Reader, ekPub, akName)
			if err != nil {
				t.Fatalf("MakeCredential: %v", err)
			}
			resp1 := roundTrip(t, api.TPMChallengeResponse{ChallengeID: "c1", CredentialBlob: credBlob, EncryptedSecret: encSecret, Nonce: nonce(t)})

			// Round 2, device.
			got, err := d.keys.ActivateCredential(resp1.CredentialBlob, resp1.EncryptedSecret)
			if err != nil {
				t.Fatalf("ActivateCredential: %v", err)
			}
			att, err := d.keys.Attest(resp1.Nonce)
			if err != nil {
				t.Fatalf("Attest: %v", err)
			}
			csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev-1"}}, d.keys.Signer())
			if err != nil {
				t.Fatalf("CreateCertificateRequest: %v", err)
			}
			req2 := roundTrip(t, api.TPMCompleteRequest{
				ChallengeID: resp1.ChallengeID, Secret: got,
				TLSPublic: att.TLSPublic, CertifyInfo: att.CertifyInfo, CertifySignature: att.CertifySignature,
				CSR: csrDER,
			})

			// Round 2, server.
			if !bytes.Equal(req2.Secret, secret) {
				t.Fatal("activated secret differs from the server's")
			}
			csr, err := x509.ParseCertificateRequest(req2.CSR)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("CSR signature: %v", err)
			}
			if err := attest.VerifyCertify(akPub, req2.TLSPublic, req2.CertifyInfo, req2.CertifySignature, resp1.Nonce, csr.PublicKey); err != nil {
				t.Fatalf("VerifyCertify: %v", err)
			}

			// The certified key authenticates a TLS 1.3 session.
			testpki.TLSHandshake(t, d.keys.Signer())
		})
	}
}

// adversaries holds three devices: a and b from the configured manufacturer,
// c from an unknown one.
type adversaries struct {
	m       *swtpm.Manufacturer
	a, b, c *device
}

func TestEnrollmentAttacks(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	adv := &adversaries{m: m, a: newDevice(t, m), b: newDevice(t, m), c: newDevice(t, swtpm.ManufacturerForTest(t))}
	a := adv.a
	akA, err := attest.VerifyAKPublic(a.keys.AKPublic())
	if err != nil {
		t.Fatal(err)
	}
	ekPubOf := func(d *device) *tpm2.TPMTPublic {
		p, err := attest.EKPublicFromCert(d.keys.EK().Cert)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	tlsKeyA := a.keys.TLSPublicKey()

	tests := []struct {
		name string
		run  func(t *testing.T) error
		want error
	}{
		{
			name: "An EK certificate from an unknown manufacturer is refused",
			run: func(t *testing.T) error {
				_, err := attest.VerifyEKCertificate(adv.c.keys.EK().CertDER, m.RootPool(), time.Now())
				return err
			},
			want: attest.ErrEKChainInvalid,
		},
		{
			name: "A TLS key certified by the AK of a different TPM is refused",
			run: func(t *testing.T) error {
				n := nonce(t)
				att, err := adv.b.keys.Attest(n)
				if err != nil {
					t.Fatal(err)
				}
				// Device a passed credential activation with its AK; the
				// certification comes from b's TPM.
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, att.CertifySignature, n, adv.b.keys.TLSPublicKey())
			},
			want: attest.ErrCertifySignature,
		},
		{
			name: "A non-restricted signing key presented as AK is refused",
			run: func(t *testing.T) error {
				tmpl := tpmkey.AKTemplate()
				tmpl.ObjectAttributes.Restricted = false
				pub2B, _ := createInTPM(t, a, tmpl)
				_, err := attest.VerifyAKPublic(pub2B)
				return err
			},
			want: attest.ErrAKNotRestricted,
		},
		{
			name: "A software key imported into the TPM and certified there is refused as exportable",
			run: func(t *testing.T) error {
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				n := nonce(t)
				pub2B, info, sig := certifyImported(t, a, sw, n)
				return attest.VerifyCertify(akA, pub2B, info, sig, n, &sw.PublicKey)
			},
			want: attest.ErrKeyExportable,
		},
		{
			name: "A duplicable TPM key (fixedTPM and fixedParent clear) is refused as exportable",
			run: func(t *testing.T) error {
				tmpl := tpmkey.TLSKeyTemplate()
				tmpl.ObjectAttributes.FixedTPM = false
				tmpl.ObjectAttributes.FixedParent = false
				pub2B, priv2B := createInTPM(t, a, tmpl)
				n := nonce(t)
				info, sig, key := certifyBlob(t, a, pub2B, priv2B, n)
				return attest.VerifyCertify(akA, pub2B, info, sig, n, key)
			},
			want: attest.ErrKeyExportable,
		},
		{
			name: "An external key loaded with its private part is refused as exportable",
			run: func(t *testing.T) error {
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				n := nonce(t)
				pub2B, info, sig := certifyExternal(t, a, sw, n)
				return attest.VerifyCertify(akA, pub2B, info, sig, n, &sw.PublicKey)
			},
			want: attest.ErrKeyExportable,
		},
		{
			name: "The TPM refuses to certify an external public key that claims fixedTPM",
			run: func(t *testing.T) error {
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				return certifyPublicOnly(t, a, &sw.PublicKey)
			},
			want: tpm2.TPMRCAuthUnavailable,
		},
		{
			name: "The TPM refuses to activate a credential for an external public key posing as AK",
			run: func(t *testing.T) error {
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				return activateForPublicOnlyAK(t, a, &sw.PublicKey, ekPubOf(a))
			},
			want: tpm2.TPMRCAuthUnavailable,
		},
		{
			name: "A tampered certify signature is refused",
			run: func(t *testing.T) error {
				n := nonce(t)
				att, err := a.keys.Attest(n)
				if err != nil {
					t.Fatal(err)
				}
				att.CertifySignature[len(att.CertifySignature)-1] ^= 0x01
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, att.CertifySignature, n, tlsKeyA)
			},
			want: attest.ErrCertifySignature,
		},
		{
			name: "A CSR for a key other than the certified one is refused",
			run: func(t *testing.T) error {
				n := nonce(t)
				att, err := a.keys.Attest(n)
				if err != nil {
					t.Fatal(err)
				}
				csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, adv.b.keys.Signer())
				if err != nil {
					t.Fatal(err)
				}
				csr, _ := x509.ParseCertificateRequest(csrDER)
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, att.CertifySignature, n, csr.PublicKey)
			},
			want: attest.ErrCSRKeyMismatch,
		},
		{
			name: "A certification with the nonce of another challenge is refused",
			run: func(t *testing.T) error {
				att, err := a.keys.Attest(nonce(t))
				if err != nil {
					t.Fatal(err)
				}
				return attest.VerifyCertify(akA, att.TLSPublic, att.CertifyInfo, att.CertifySignature, nonce(t), tlsKeyA)
			},
			want: attest.ErrNonceMismatch,
		},
		{
			name: "A credential made for another TPM's EK does not activate",
			run: func(t *testing.T) error {
				cred, enc, _, err := attest.MakeCredential(rand.Reader, ekPubOf(adv.b), a.keys.AKName())
				if err != nil {
					t.Fatal(err)
				}
				_, err = a.keys.ActivateCredential(cred, enc)
				return err
			},
			want: tpmkey.ErrActivation,
		},
		{
			name: "A credential made for an AK that lives in another TPM does not activate",
			run: func(t *testing.T) error {
				// The attacker sends a's EK certificate with b's AK: only a
				// can decrypt, but a does not hold b's AK.
				cred, enc, _, err := attest.MakeCredential(rand.Reader, ekPubOf(a), adv.b.keys.AKName())
				if err != nil {
					t.Fatal(err)
				}
				_, errA := a.keys.ActivateCredential(cred, enc)
				_, errB := adv.b.keys.ActivateCredential(cred, enc)
				if !errors.Is(errB, tpmkey.ErrActivation) {
					t.Errorf("activation in b: err = %v, want ErrActivation", errB)
				}
				return errA
			},
			want: tpmkey.ErrActivation,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

// The helpers below drive a device's TPM directly with go-tpm, as an
// attacker with root on the device could: the AK is loaded from the device's
// own key state files.

func rawTPM(t *testing.T, d *device) transport.TPMCloser {
	t.Helper()
	tr, err := linuxudstpm.Open(d.inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr
}

func flushLater(t *testing.T, tr transport.TPM, h tpm2.TPMHandle) {
	t.Cleanup(func() { tpm2.FlushContext{FlushHandle: h}.Execute(tr) })
}

// withSRK creates the device's SRK, runs f and flushes the SRK, so that at
// most two more objects are loaded at a time (swtpm has three slots).
func withSRK(t *testing.T, tr transport.TPM, f func(srk tpm2.AuthHandle)) {
	t.Helper()
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tr)
	if err != nil {
		t.Fatalf("CreatePrimary(SRK): %v", err)
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(tr)
	f(tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)})
}

func load(t *testing.T, tr transport.TPM, srk tpm2.AuthHandle, pub2B, priv2B []byte) tpm2.AuthHandle {
	t.Helper()
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2B)
	if err != nil {
		t.Fatal(err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](priv2B)
	if err != nil {
		t.Fatal(err)
	}
	rsp, err := tpm2.Load{ParentHandle: srk, InPrivate: *priv, InPublic: *pub}.Execute(tr)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	flushLater(t, tr, rsp.ObjectHandle)
	return tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}
}

func loadAK(t *testing.T, tr transport.TPM, srk tpm2.AuthHandle, d *device) tpm2.AuthHandle {
	t.Helper()
	pub, err := os.ReadFile(filepath.Join(d.state, tpmkey.AKPublicFile))
	if err != nil {
		t.Fatal(err)
	}
	priv, err := os.ReadFile(filepath.Join(d.state, tpmkey.AKPrivateFile))
	if err != nil {
		t.Fatal(err)
	}
	return load(t, tr, srk, pub, priv)
}

func certify(t *testing.T, tr transport.TPM, obj, ak tpm2.AuthHandle, n []byte) (info, sig []byte) {
	t.Helper()
	rsp, err := tpm2.Certify{ObjectHandle: obj, SignHandle: ak, QualifyingData: tpm2.TPM2BData{Buffer: n}, InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}}.Execute(tr)
	if err != nil {
		t.Fatalf("Certify: %v", err)
	}
	return tpm2.Marshal(rsp.CertifyInfo), tpm2.Marshal(rsp.Signature)
}

// createInTPM creates a key from tmpl under the device's SRK.
func createInTPM(t *testing.T, d *device, tmpl tpm2.TPMTPublic) (pub2B, priv2B []byte) {
	t.Helper()
	tr := rawTPM(t, d)
	withSRK(t, tr, func(srk tpm2.AuthHandle) {
		rsp, err := tpm2.Create{ParentHandle: srk, InPublic: tpm2.New2B(tmpl)}.Execute(tr)
		if err != nil {
			t.Fatalf("Create: %v", err)
		}
		pub2B, priv2B = tpm2.Marshal(rsp.OutPublic), tpm2.Marshal(rsp.OutPrivate)
	})
	return pub2B, priv2B
}

// certifyBlob loads a key blob and has the device's AK certify it.
func certifyBlob(t *testing.T, d *device, pub2B, priv2B, n []byte) (info, sig []byte, key crypto.PublicKey) {
	t.Helper()
	tr := rawTPM(t, d)
	var ak, obj tpm2.AuthHandle
	withSRK(t, tr, func(srk tpm2.AuthHandle) {
		ak = loadAK(t, tr, srk, d)
		obj = load(t, tr, srk, pub2B, priv2B)
	})
	info, sig = certify(t, tr, obj, ak, n)
	pub, _ := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2B)
	tp, _ := pub.Contents()
	key, err := tpm2.Pub(*tp)
	if err != nil {
		t.Fatal(err)
	}
	return info, sig, key
}

func swPublic(k *ecdsa.PublicKey, attrs tpm2.TPMAObject) tpm2.TPMTPublic {
	p := tpmkey.TLSKeyTemplate()
	p.ObjectAttributes = attrs
	p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	return p
}

func swSensitive(k *ecdsa.PrivateKey) tpm2.TPMTSensitive {
	return tpm2.TPMTSensitive{
		SensitiveType: tpm2.TPMAlgECC,
		Sensitive:     tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: k.D.FillBytes(make([]byte, 32))}),
	}
}

// certifyImported imports a software key under the SRK with TPM2_Import (an
// unwrapped duplicate), loads it and has the AK certify it. An imported key
// cannot be fixedTPM, fixedParent or sensitiveDataOrigin: the TPM refuses
// those attributes on import.
func certifyImported(t *testing.T, d *device, sw *ecdsa.PrivateKey, n []byte) (pub2B, info, sig []byte) {
	t.Helper()
	tr := rawTPM(t, d)
	pub := swPublic(&sw.PublicKey, tpm2.TPMAObject{UserWithAuth: true, SignEncrypt: true})
	// Without inner and outer wrapper the duplicate is a TPM2B_SENSITIVE.
	dup := tpm2.Marshal(tpm2.TPM2BPrivate{Buffer: tpm2.Marshal(swSensitive(sw))})
	var ak, obj tpm2.AuthHandle
	withSRK(t, tr, func(srk tpm2.AuthHandle) {
		ak = loadAK(t, tr, srk, d)
		imp, err := tpm2.Import{
			ParentHandle: srk,
			ObjectPublic: tpm2.New2B(pub),
			Duplicate:    tpm2.TPM2BPrivate{Buffer: dup},
			Symmetric:    tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
		}.Execute(tr)
		if err != nil {
			t.Fatalf("Import: %v", err)
		}
		pub2B = tpm2.Marshal(tpm2.New2B(pub))
		obj = load(t, tr, srk, pub2B, tpm2.Marshal(imp.OutPrivate))
	})
	info, sig = certify(t, tr, obj, ak, n)
	return pub2B, info, sig
}

// certifyExternal loads a software key with TPM2_LoadExternal (private part
// included, which the TPM only allows without fixedTPM and fixedParent) and
// has the AK certify it.
func certifyExternal(t *testing.T, d *device, sw *ecdsa.PrivateKey, n []byte) (pub2B, info, sig []byte) {
	t.Helper()
	tr := rawTPM(t, d)
	pub := swPublic(&sw.PublicKey, tpm2.TPMAObject{UserWithAuth: true, SignEncrypt: true})
	var ak tpm2.AuthHandle
	withSRK(t, tr, func(srk tpm2.AuthHandle) { ak = loadAK(t, tr, srk, d) })
	rsp, err := tpm2.LoadExternal{
		InPrivate: tpm2.New2B(swSensitive(sw)),
		InPublic:  tpm2.New2B(pub),
		Hierarchy: tpm2.TPMRHNull,
	}.Execute(tr)
	if err != nil {
		t.Fatalf("LoadExternal: %v", err)
	}
	flushLater(t, tr, rsp.ObjectHandle)
	info, sig = certify(t, tr, tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}, ak, n)
	return tpm2.Marshal(tpm2.New2B(pub)), info, sig
}

// certifyPublicOnly loads only the public part of a software key, claiming
// fixedTPM, fixedParent and sensitiveDataOrigin and authorizing Certify by a
// trivially satisfiable policy, and asks the AK to certify it. The TPM must
// refuse: that is why VerifyCertify may trust the certified attributes.
func certifyPublicOnly(t *testing.T, d *device, k *ecdsa.PublicKey) error {
	t.Helper()
	tr := rawTPM(t, d)
	pc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := (tpm2.PolicyCommandCode{Code: tpm2.TPMCCCertify}).Update(pc); err != nil {
		t.Fatal(err)
	}
	pub := swPublic(k, tpmkey.TLSKeyTemplate().ObjectAttributes)
	pub.ObjectAttributes.AdminWithPolicy = true
	pub.AuthPolicy = tpm2.TPM2BDigest{Buffer: pc.Hash().Digest}
	var ak tpm2.AuthHandle
	withSRK(t, tr, func(srk tpm2.AuthHandle) { ak = loadAK(t, tr, srk, d) })
	rsp, err := tpm2.LoadExternal{InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHOwner}.Execute(tr)
	if err != nil {
		return err
	}
	flushLater(t, tr, rsp.ObjectHandle)
	policy := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicyCommandCode{PolicySession: h, Code: tpm2.TPMCCCertify}.Execute(tr)
		return err
	})
	_, err = tpm2.Certify{
		ObjectHandle:   tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: policy},
		SignHandle:     ak,
		QualifyingData: tpm2.TPM2BData{Buffer: nonce(t)},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(tr)
	return err
}

// activateForPublicOnlyAK loads only the public part of a software key as a
// restricted signing "AK" (with a trivially satisfiable policy) and tries to
// activate a credential made for it with the device's RSA EK. If the TPM
// allowed it, an attacker would hold the AK's private key in software.
func activateForPublicOnlyAK(t *testing.T, d *device, k *ecdsa.PublicKey, ekPub *tpm2.TPMTPublic) error {
	t.Helper()
	tr := rawTPM(t, d)
	pc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := (tpm2.PolicyCommandCode{Code: tpm2.TPMCCActivateCredential}).Update(pc); err != nil {
		t.Fatal(err)
	}
	pub := swPublic(k, tpmkey.AKTemplate().ObjectAttributes)
	pub.Parameters = tpmkey.AKTemplate().Parameters
	pub.ObjectAttributes.AdminWithPolicy = true
	pub.AuthPolicy = tpm2.TPM2BDigest{Buffer: pc.Hash().Digest}
	le, err := tpm2.LoadExternal{InPublic: tpm2.New2B(pub), Hierarchy: tpm2.TPMRHOwner}.Execute(tr)
	if err != nil {
		return err
	}
	flushLater(t, tr, le.ObjectHandle)
	cred, enc, _, err := attest.MakeCredential(rand.Reader, ekPub, le.Name.Buffer)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpm2.RSAEKTemplate)}.Execute(tr)
	if err != nil {
		t.Fatalf("CreatePrimary(EK): %v", err)
	}
	flushLater(t, tr, ek.ObjectHandle)
	_, err = tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: le.ObjectHandle, Name: le.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicyCommandCode{PolicySession: h, Code: tpm2.TPMCCActivateCredential}.Execute(tr)
			return err
		})},
		KeyHandle: tpm2.AuthHandle{Handle: ek.ObjectHandle, Name: ek.Name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, n tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: h, NonceTPM: n}.Execute(tr)
			return err
		})},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: cred},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: enc},
	}.Execute(tr)
	return err
}
