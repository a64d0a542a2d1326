package enroll_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/adminclient"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

// ---- fixtures ----

// tpmDevice is a simulated device: its own swtpm, its TPM-resident keys and
// a devicesdk.Device whose key is the TPM's TLS key. Key blobs and the
// certificate chain share one state directory.
type tpmDevice struct {
	inst  *swtpm.Instance
	tpm   *tpmkey.TPM
	keys  *tpmkey.Keys
	state string
	dev   *devicesdk.Device
}

func newTPMDevice(tb testing.TB, m *swtpm.Manufacturer, url string, roots *x509.CertPool, id string) *tpmDevice {
	tb.Helper()
	d := &tpmDevice{state: filepath.Join(tb.TempDir(), "state")}
	d.inst, d.tpm = swtpm.DeviceForTest(tb, m)
	d.loadKeys(tb, url, roots, id, d.state)
	return d
}

// loadKeys (re)creates the device's keys in dir and a Device for them.
func (d *tpmDevice) loadKeys(tb testing.TB, url string, roots *x509.CertPool, id, dir string) {
	tb.Helper()
	var err error
	if d.keys, err = d.tpm.LoadOrCreateKeys(dir); err != nil {
		tb.Fatalf("LoadOrCreateKeys: %v", err)
	}
	d.state = dir
	if id == "" {
		id = api.AutoDeviceID(d.keys.EK().Cert.RawSubjectPublicKeyInfo)
	}
	if d.dev, err = devicesdk.New(devicesdk.Config{DeviceID: id, Key: d.keys.Signer(), StateDir: dir, EnrollURL: url, RootCAs: roots}); err != nil {
		tb.Fatalf("devicesdk.New: %v", err)
	}
}

// tpmGateway is a gateway trusting a fresh simulated TPM manufacturer
// (--tpm-roots), with the given TPM policy ("": the default, allowlist).
func tpmGateway(tb testing.TB, policy string) (*swtpm.Manufacturer, *testenv.Gateway) {
	tb.Helper()
	m := swtpm.ManufacturerForTest(tb)
	return m, testenv.Start(tb, testenv.Options{TPMRootsDir: rootsDir(tb, m), TPMPolicy: policy})
}

// rootsDir writes the manufacturer roots where --tpm-roots expects them.
func rootsDir(tb testing.TB, ms ...*swtpm.Manufacturer) string {
	tb.Helper()
	dir := tb.TempDir()
	for i, m := range ms {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("mfr-%d.pem", i)), m.RootPEM(), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

func register(tb testing.TB, g *testenv.Gateway, d *tpmDevice, id, group string) {
	tb.Helper()
	if _, err := g.Admin.RegisterEK(context.Background(), api.EKRegisterRequest{EKCert: d.keys.EK().CertDER, DeviceID: id, Group: group}); err != nil {
		tb.Fatalf("register %s: %v", id, err)
	}
}

// target is an enrollment server and a client for it.
type target struct {
	url string
	hc  *http.Client
}

func gatewayTarget(g *testenv.Gateway) target {
	return target{url: g.URL(), hc: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: g.Roots(), MinVersion: tls.VersionTLS12}}}}
}

func plainTarget(url string) target {
	return target{url: url, hc: &http.Client{Timeout: 30 * time.Second}}
}

// postJSON posts in and decodes a 200 answer into out.
func postJSON(tb testing.TB, to target, path string, in, out any) (int, api.Error) {
	tb.Helper()
	body, err := json.Marshal(in)
	if err != nil {
		tb.Fatal(err)
	}
	resp, err := to.hc.Post(to.url+path, "application/json", bytes.NewReader(body))
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e api.Error
	if resp.StatusCode != http.StatusOK {
		if err := json.Unmarshal(b, &e); err != nil {
			tb.Fatalf("error body is not JSON: %q", b)
		}
		return resp.StatusCode, e
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			tb.Fatal(err)
		}
	}
	return resp.StatusCode, e
}

func csrBy(tb testing.TB, key crypto.Signer) []byte {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// round1 asks for a challenge for d's EK and AK.
func round1(tb testing.TB, to target, d *tpmDevice, id string) api.TPMChallengeResponse {
	tb.Helper()
	var ch api.TPMChallengeResponse
	if code, e := postJSON(tb, to, api.PathTPMChallenge, api.TPMChallengeRequest{DeviceID: id, EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()}, &ch); code != http.StatusOK {
		tb.Fatalf("challenge: %d %+v", code, e)
	}
	return ch
}

// round2 is an honest completion of ch by d.
func round2(tb testing.TB, d *tpmDevice, ch api.TPMChallengeResponse) api.TPMCompleteRequest {
	tb.Helper()
	secret, err := d.keys.ActivateCredential(ch.CredentialBlob, ch.EncryptedSecret)
	if err != nil {
		tb.Fatalf("ActivateCredential: %v", err)
	}
	att, err := d.keys.Attest(ch.Nonce)
	if err != nil {
		tb.Fatalf("Attest: %v", err)
	}
	return api.TPMCompleteRequest{ChallengeID: ch.ChallengeID, Secret: secret, TLSPublic: att.TLSPublic,
		CertifyInfo: att.CertifyInfo, CertifySignature: att.CertifySignature, CSR: csrBy(tb, d.keys.Signer())}
}

// ---- the happy path ----

// TestTPMEnrollmentEndToEnd: a device with a swtpm enrolls over HTTPS by
// attestation, connects to the broker with the TPM-held key, publishes, and
// a service receives it. Its private key is nowhere on disk.
func TestTPMEnrollmentEndToEnd(t *testing.T) {
	t.Parallel()
	m, g := tpmGateway(t, "")
	ctx := context.Background()
	d := newTPMDevice(t, m, g.URL(), g.Roots(), "sensor-1")
	register(t, g, d, "sensor-1", "greenhouse")

	if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
		t.Fatalf("EnrollTPM: %v", err)
	}
	info, err := g.Admin.Device(ctx, "sensor-1")
	if err != nil {
		t.Fatal(err)
	}
	if info.AttestationMethod != fleet.MethodTPM || info.State != string(fleet.StateActive) || info.Group != "greenhouse" || info.Serial == "" {
		t.Fatalf("device after enrollment: %+v", info)
	}
	if leaf := d.dev.Leaf(); ca.SerialString(leaf.SerialNumber) != info.Serial || !d.keys.TLSPublicKey().Equal(leaf.PublicKey) {
		t.Fatalf("leaf serial %x key %v, registry serial %s", leaf.SerialNumber, leaf.PublicKey, info.Serial)
	}

	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 4)
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + "=" + string(m.Payload()) }); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	c, err := d.dev.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: true})
	if err != nil {
		t.Fatalf("Connect with the TPM key: %v", err)
	}
	defer c.Close()
	if err := c.PublishTelemetry(ctx, "temp", 1, []byte("21.5")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m != "devices/sensor-1/telemetry/temp=21.5" {
			t.Fatalf("service got %q", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("telemetry not delivered")
	}

	// Nothing in the device's state directory is a private key: the TPM
	// holds it, the directory holds TPM-wrapped blobs and certificates.
	assertNoPrivateKey(t, d.state)
}

// assertNoPrivateKey fails if any file under dir parses as a private key in
// any encoding Go knows (PEM or DER: PKCS#8, SEC 1, PKCS#1).
func assertNoPrivateKey(t *testing.T, dir string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		n++
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		testpki.NoPrivateKey(t, p, b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 6 { // ak.pub/priv, tls.pub/priv, cert.pem, ca.pem
		t.Fatalf("only %d files under %s; the check saw nothing", n, dir)
	}
}

// ---- adversaries ----

// attacker drives a device's TPM directly with go-tpm, as root on the
// device could, loading the AK from the device's own state files.
type attacker struct {
	t  *testing.T
	d  *tpmDevice
	tr transport.TPMCloser
}

func newAttacker(t *testing.T, d *tpmDevice) *attacker {
	t.Helper()
	tr, err := linuxudstpm.Open(d.inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return &attacker{t: t, d: d, tr: tr}
}

func (a *attacker) flushLater(h tpm2.TPMHandle) {
	a.t.Cleanup(func() { tpm2.FlushContext{FlushHandle: h}.Execute(a.tr) })
}

func (a *attacker) withSRK(f func(srk tpm2.AuthHandle)) {
	a.t.Helper()
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(a.tr)
	if err != nil {
		a.t.Fatalf("CreatePrimary(SRK): %v", err)
	}
	defer tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(a.tr)
	f(tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)})
}

func (a *attacker) load(srk tpm2.AuthHandle, pub2B, priv2B []byte) tpm2.AuthHandle {
	a.t.Helper()
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](pub2B)
	if err != nil {
		a.t.Fatal(err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](priv2B)
	if err != nil {
		a.t.Fatal(err)
	}
	rsp, err := tpm2.Load{ParentHandle: srk, InPrivate: *priv, InPublic: *pub}.Execute(a.tr)
	if err != nil {
		a.t.Fatalf("Load: %v", err)
	}
	a.flushLater(rsp.ObjectHandle)
	return tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}
}

func (a *attacker) loadAK(srk tpm2.AuthHandle) tpm2.AuthHandle {
	a.t.Helper()
	pub, err := os.ReadFile(filepath.Join(a.d.state, tpmkey.AKPublicFile))
	if err != nil {
		a.t.Fatal(err)
	}
	priv, err := os.ReadFile(filepath.Join(a.d.state, tpmkey.AKPrivateFile))
	if err != nil {
		a.t.Fatal(err)
	}
	return a.load(srk, pub, priv)
}

// createKey creates a key from tmpl in the device's TPM (under its SRK).
func (a *attacker) createKey(tmpl tpm2.TPMTPublic) (pub2B []byte) {
	a.t.Helper()
	a.withSRK(func(srk tpm2.AuthHandle) {
		rsp, err := tpm2.Create{ParentHandle: srk, InPublic: tpm2.New2B(tmpl)}.Execute(a.tr)
		if err != nil {
			a.t.Fatalf("Create: %v", err)
		}
		pub2B = tpm2.Marshal(rsp.OutPublic)
	})
	return pub2B
}

// certifyImported imports a software key into the TPM (TPM2_Import of an
// unwrapped duplicate: neither fixedTPM, fixedParent nor
// sensitiveDataOrigin) and has the device's genuine AK certify it.
func (a *attacker) certifyImported(sw *ecdsa.PrivateKey, nonce []byte) (pub2B, info, sig []byte) {
	a.t.Helper()
	pub := tpmkey.TLSKeyTemplate()
	pub.ObjectAttributes = tpm2.TPMAObject{UserWithAuth: true, SignEncrypt: true}
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: sw.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: sw.Y.FillBytes(make([]byte, 32))},
	})
	sens := tpm2.TPMTSensitive{SensitiveType: tpm2.TPMAlgECC,
		Sensitive: tpm2.NewTPMUSensitiveComposite(tpm2.TPMAlgECC, &tpm2.TPM2BECCParameter{Buffer: sw.D.FillBytes(make([]byte, 32))})}
	dup := tpm2.Marshal(tpm2.TPM2BPrivate{Buffer: tpm2.Marshal(sens)})
	var ak, obj tpm2.AuthHandle
	a.withSRK(func(srk tpm2.AuthHandle) {
		ak = a.loadAK(srk)
		imp, err := tpm2.Import{ParentHandle: srk, ObjectPublic: tpm2.New2B(pub), Duplicate: tpm2.TPM2BPrivate{Buffer: dup},
			Symmetric: tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull}}.Execute(a.tr)
		if err != nil {
			a.t.Fatalf("Import: %v", err)
		}
		pub2B = tpm2.Marshal(tpm2.New2B(pub))
		obj = a.load(srk, pub2B, tpm2.Marshal(imp.OutPrivate))
	})
	rsp, err := tpm2.Certify{ObjectHandle: obj, SignHandle: ak, QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}}.Execute(a.tr)
	if err != nil {
		a.t.Fatalf("Certify: %v", err)
	}
	return pub2B, tpm2.Marshal(rsp.CertifyInfo), tpm2.Marshal(rsp.Signature)
}

// TestTPMEnrollmentAttacks: each attack is refused with its own code, an
// audit record and a metric, and nothing is issued.
func TestTPMEnrollmentAttacks(t *testing.T) {
	t.Parallel()
	m, g := tpmGateway(t, "")
	url := g.URL()
	to := gatewayTarget(g)
	a := newTPMDevice(t, m, url, g.Roots(), "dev-a")
	b := newTPMDevice(t, m, url, g.Roots(), "dev-b")
	unregistered := newTPMDevice(t, m, url, g.Roots(), "dev-c")
	foreign := newTPMDevice(t, swtpm.ManufacturerForTest(t), url, g.Roots(), "dev-x")
	register(t, g, a, "dev-a", "lab")
	register(t, g, b, "dev-b", "lab")

	// The registration of a foreign EK is refused too, before any device
	// shows up.
	if _, err := g.Admin.RegisterEK(context.Background(), api.EKRegisterRequest{EKCert: foreign.keys.EK().CertDER, DeviceID: "dev-x"}); !isCode(err, "ek_chain_invalid") {
		t.Fatalf("registering an EK of an unknown manufacturer: %v", err)
	}

	challengeWith := func(t *testing.T, req api.TPMChallengeRequest) (int, api.Error) {
		return postJSON(t, to, api.PathTPMChallenge, req, nil)
	}
	complete := func(t *testing.T, req api.TPMCompleteRequest) (int, api.Error) {
		return postJSON(t, to, api.PathTPMComplete, req, nil)
	}
	tests := []struct {
		name string
		run  func(t *testing.T) (int, api.Error)
		want string
	}{
		{
			name: "enroll fails if the EK is not registered (allowlist policy)",
			run: func(t *testing.T) (int, api.Error) {
				return challengeWith(t, api.TPMChallengeRequest{EKCert: unregistered.keys.EK().CertDER, AKPublic: unregistered.keys.AKPublic()})
			},
			want: "ek_not_registered",
		},
		{
			name: "enroll fails if the EK certificate is from an unknown manufacturer CA",
			run: func(t *testing.T) (int, api.Error) {
				return challengeWith(t, api.TPMChallengeRequest{EKCert: foreign.keys.EK().CertDER, AKPublic: foreign.keys.AKPublic()})
			},
			want: "ek_chain_invalid",
		},
		{
			name: "enroll fails if a TPM claims the device ID another TPM is registered for",
			run: func(t *testing.T) (int, api.Error) {
				return challengeWith(t, api.TPMChallengeRequest{DeviceID: "dev-a", EKCert: b.keys.EK().CertDER, AKPublic: b.keys.AKPublic()})
			},
			want: "device_id_mismatch",
		},
		{
			name: "enroll fails if the AK is not restricted",
			run: func(t *testing.T) (int, api.Error) {
				tmpl := tpmkey.AKTemplate()
				tmpl.ObjectAttributes.Restricted = false
				pub := newAttacker(t, a).createKey(tmpl)
				return challengeWith(t, api.TPMChallengeRequest{EKCert: a.keys.EK().CertDER, AKPublic: pub})
			},
			want: "ak_not_restricted",
		},
		{
			name: "enroll fails if the TLS key is certified by the AK of a different TPM",
			run: func(t *testing.T) (int, api.Error) {
				ch := round1(t, to, a, "")
				req := round2(t, a, ch)
				att, err := b.keys.Attest(ch.Nonce)
				if err != nil {
					t.Fatal(err)
				}
				req.TLSPublic, req.CertifyInfo, req.CertifySignature = att.TLSPublic, att.CertifyInfo, att.CertifySignature
				req.CSR = csrBy(t, b.keys.Signer())
				return complete(t, req)
			},
			want: "certify_signature_invalid",
		},
		{
			name: "enroll fails if the TLS key was imported into the TPM (not sensitiveDataOrigin, not fixedTPM)",
			run: func(t *testing.T) (int, api.Error) {
				ch := round1(t, to, a, "")
				req := round2(t, a, ch)
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				req.TLSPublic, req.CertifyInfo, req.CertifySignature = newAttacker(t, a).certifyImported(sw, ch.Nonce)
				req.CSR = csrBy(t, sw)
				return complete(t, req)
			},
			want: "key_exportable",
		},
		{
			name: "enroll fails if the certify signature is tampered",
			run: func(t *testing.T) (int, api.Error) {
				req := round2(t, a, round1(t, to, a, ""))
				req.CertifySignature[len(req.CertifySignature)-1] ^= 0x01
				return complete(t, req)
			},
			want: "certify_signature_invalid",
		},
		{
			name: "enroll fails if the CSR is for a key other than the certified one",
			run: func(t *testing.T) (int, api.Error) {
				req := round2(t, a, round1(t, to, a, ""))
				sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
				req.CSR = csrBy(t, sw)
				return complete(t, req)
			},
			want: "csr_key_mismatch",
		},
		{
			name: "enroll fails if the certification carries another challenge's nonce",
			run: func(t *testing.T) (int, api.Error) {
				ch := round1(t, to, a, "")
				req := round2(t, a, ch)
				other := bytes.Clone(ch.Nonce)
				other[0] ^= 0xff
				att, err := a.keys.Attest(other)
				if err != nil {
					t.Fatal(err)
				}
				req.CertifyInfo, req.CertifySignature = att.CertifyInfo, att.CertifySignature
				return complete(t, req)
			},
			want: "nonce_mismatch",
		},
		{
			name: "enroll fails with a wrong activation secret",
			run: func(t *testing.T) (int, api.Error) {
				req := round2(t, a, round1(t, to, a, ""))
				req.Secret[0] ^= 0x01
				return complete(t, req)
			},
			want: "wrong_secret",
		},
		{
			name: "enroll fails if the activation secret is guessed twice (the challenge is gone after a failure)",
			run: func(t *testing.T) (int, api.Error) {
				req := round2(t, a, round1(t, to, a, ""))
				good := bytes.Clone(req.Secret)
				req.Secret[0] ^= 0x01
				if code, e := complete(t, req); e.Code != "wrong_secret" {
					t.Fatalf("first attempt: %d %+v", code, e)
				}
				req.Secret = good
				return complete(t, req)
			},
			want: "challenge_unknown",
		},
		{
			name: "enroll fails for a challenge ID the server never issued",
			run: func(t *testing.T) (int, api.Error) {
				req := round2(t, a, round1(t, to, a, ""))
				req.ChallengeID = strings.Repeat("0", 32)
				return complete(t, req)
			},
			want: "challenge_unknown",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, e := tc.run(t)
			if e.Code != tc.want || code/100 != 4 {
				t.Fatalf("got %d %q (%s), want 4xx %q", code, e.Code, e.Message, tc.want)
			}
		})
	}

	// Nothing was issued, to anyone.
	ctx := context.Background()
	for _, id := range []string{"dev-a", "dev-b"} {
		d, err := g.Admin.Device(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if d.Serial != "" || d.State != string(fleet.StateRegistered) {
			t.Errorf("%s after the attacks: %+v", id, d)
		}
	}
	for _, id := range []string{"dev-c", "dev-x"} {
		if _, err := g.Admin.Device(ctx, id); !isCode(err, "not_found") {
			t.Errorf("%s exists after the attacks: %v", id, err)
		}
	}
	// Every refusal is audited and counted under its code.
	recs, err := g.Admin.Audit(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	metrics := g.Metrics(t)
	for _, tc := range tests {
		if !slices.ContainsFunc(recs, func(r api.AuditRecord) bool {
			return r.Outcome == registry.OutcomeDenied && strings.HasPrefix(r.Action, "enroll.tpm") && strings.HasPrefix(r.Reason, tc.want+":")
		}) {
			t.Errorf("no audit record for %s", tc.want)
		}
		if !strings.Contains(metrics, `fleetgate_enrollments_total{method="tpm",outcome="`+tc.want+`"}`) {
			t.Errorf("no metric for %s", tc.want)
		}
	}
	if slices.ContainsFunc(recs, func(r api.AuditRecord) bool {
		return r.Outcome == registry.OutcomeOK && strings.HasPrefix(r.Action, "enroll.")
	}) {
		t.Fatal("an enrollment succeeded during the attacks")
	}

	// After all that, the genuine device still enrolls; replaying its
	// completion is refused.
	ch := round1(t, to, a, "dev-a")
	req := round2(t, a, ch)
	var resp api.EnrollResponse
	if code, e := postJSON(t, to, api.PathTPMComplete, req, &resp); code != http.StatusOK {
		t.Fatalf("genuine enrollment: %d %+v", code, e)
	}
	if resp.DeviceID != "dev-a" {
		t.Fatalf("issued for %q", resp.DeviceID)
	}
	if code, e := postJSON(t, to, api.PathTPMComplete, req, nil); e.Code != "challenge_unknown" {
		t.Fatalf("replayed completion: %d %+v, want challenge_unknown", code, e)
	}
}

func isCode(err error, code string) bool {
	var e *adminclient.Error
	return errors.As(err, &e) && e.Code == code
}

// ---- challenge expiry, with an injected clock ----

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// directServer runs an enroll.Server on plain HTTP with an injected clock,
// a real CA and a real registry.
func directServer(tb testing.TB, roots *x509.CertPool, policy string, now func() time.Time) (string, *registry.Registry) {
	tb.Helper()
	dataDir := testenv.Init(tb)
	auth, err := ca.Load(dataDir, ca.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	// Fuzzing wants many executions a second: no fsync per audit record.
	_, fuzzing := tb.(*testing.F)
	reg, err := registry.Open(filepath.Join(tb.TempDir(), "registry"), registry.Options{InMemory: fuzzing})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { reg.Close() })
	s, err := enroll.New(enroll.Config{CA: auth, Registry: reg, TPMRoots: roots, TPMPolicy: policy, Now: now, ChallengeTTL: time.Minute})
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(s.Handler())
	tb.Cleanup(srv.Close)
	return srv.URL, reg
}

func TestTPMChallengeExpiry(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	clock := &fakeClock{t: time.Now()}
	url, reg := directServer(t, m.RootPool(), enroll.TPMPolicyAllowlist, clock.Now)
	d := newTPMDevice(t, m, url, nil, "dev-e")
	// The clock starts once the EK certificate exists: swtpm dates it to
	// the second of its creation, which may be after the clock was made.
	clock.mu.Lock()
	clock.t = time.Now()
	clock.mu.Unlock()
	if err := reg.RegisterEK(registry.EKRegistration{Fingerprint: api.EKFingerprint(d.keys.EK().Cert.RawSubjectPublicKeyInfo), DeviceID: "dev-e", Group: "lab"}, "test"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		advance time.Duration
		want    string
	}{
		{"enroll fails when the challenge expired", time.Minute, "challenge_expired"},
		{"enroll fails long after the challenge expired", time.Hour, "challenge_expired"},
		{"enroll succeeds just before the challenge expires", time.Minute - time.Second, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := round2(t, d, round1(t, plainTarget(url), d, "dev-e"))
			clock.Advance(tc.advance)
			code, e := postJSON(t, plainTarget(url), api.PathTPMComplete, req, nil)
			if e.Code != tc.want {
				t.Fatalf("got %d %+v, want %q", code, e, tc.want)
			}
			dev, err := reg.Device("dev-e")
			if err != nil {
				t.Fatal(err)
			}
			if issued := dev.CurrentSerial != ""; issued != (tc.want == "") {
				t.Fatalf("issued = %v after %q", issued, tc.want)
			}
		})
	}
	recs, err := reg.AuditLog("dev-e", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(recs, func(r registry.AuditRecord) bool { return strings.HasPrefix(r.Reason, "challenge_expired:") }) {
		t.Errorf("no audit record for the expired challenge: %+v", recs)
	}
}

// ---- re-enrollment policy and the manufacturer policy ----

// TestTPMReEnrollment: a device whose TLS key was reset (new key state in
// the same TPM) enrolls again with its registered EK; the earlier
// certificate stays valid until it expires (it still connects).
func TestTPMReEnrollment(t *testing.T) {
	t.Parallel()
	m, g := tpmGateway(t, "")
	ctx := context.Background()
	d := newTPMDevice(t, m, g.URL(), g.Roots(), "dev-r")
	register(t, g, d, "dev-r", "lab")
	if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
		t.Fatal(err)
	}
	before := *d
	first, _ := g.Admin.Device(ctx, "dev-r")

	// Factory reset: the key state is gone; new AK and TLS key, same TPM.
	d.loadKeys(t, g.URL(), g.Roots(), "dev-r", filepath.Join(t.TempDir(), "after-reset"))
	if d.keys.TLSPublicKey().Equal(before.keys.TLSPublicKey()) {
		t.Fatal("reset kept the TLS key")
	}
	if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
		t.Fatalf("re-enrollment: %v", err)
	}
	second, _ := g.Admin.Device(ctx, "dev-r")
	if second.Serial == first.Serial || second.AttestationMethod != fleet.MethodTPM {
		t.Fatalf("after re-enrollment: %+v (first serial %s)", second, first.Serial)
	}
	for name, dev := range map[string]*devicesdk.Device{"new": d.dev, "earlier": before.dev} {
		c, err := dev.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: true})
		if err != nil {
			t.Fatalf("%s certificate does not connect: %v", name, err)
		}
		c.Close()
	}
	assertNoPrivateKey(t, d.state)
}

// TestTPMManufacturerPolicy: any EK chaining to a trusted manufacturer
// enrolls with an auto-assigned ID; others are refused.
func TestTPMManufacturerPolicy(t *testing.T) {
	t.Parallel()
	m, g := tpmGateway(t, enroll.TPMPolicyManufacturer)
	ctx := context.Background()
	d := newTPMDevice(t, m, g.URL(), g.Roots(), "")
	id := d.dev.ID()
	if !strings.HasPrefix(id, api.AutoDeviceIDPrefix) || len(id) != len(api.AutoDeviceIDPrefix)+16 {
		t.Fatalf("auto ID %q", id)
	}
	if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
		t.Fatal(err)
	}
	info, err := g.Admin.Device(ctx, id)
	if err != nil || info.AttestationMethod != fleet.MethodTPM || info.Group != "default" {
		t.Fatalf("%+v %v", info, err)
	}
	// The same TPM again gets the same ID (deterministic from the EK).
	if err := d.dev.EnrollTPM(ctx, d.keys); err != nil {
		t.Fatalf("second enrollment: %v", err)
	}
	foreign := newTPMDevice(t, swtpm.ManufacturerForTest(t), g.URL(), g.Roots(), "")
	var ae *devicesdk.APIError
	if err := foreign.dev.EnrollTPM(ctx, foreign.keys); !errors.As(err, &ae) || ae.Code != "ek_chain_invalid" {
		t.Fatalf("foreign TPM: %v, want ek_chain_invalid", err)
	}
	// A device may not pick its own ID under this policy.
	if code, e := postJSON(t, gatewayTarget(g), api.PathTPMChallenge, api.TPMChallengeRequest{DeviceID: "my-choice", EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()}, nil); e.Code != "device_id_mismatch" {
		t.Fatalf("chosen ID: %d %+v", code, e)
	}
}

// ---- bulk import ----

// selfSignedEK returns a self-signed EK certificate (TCG profile, P-256
// key), for registration tests of a gateway without manufacturer roots.
func selfSignedEK(tb testing.TB) []byte { return testpki.SelfSignedEK(tb) }

func TestEKBulkImport(t *testing.T) {
	t.Parallel()
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	taken := selfSignedEK(t)
	if _, err := g.Admin.RegisterEK(ctx, api.EKRegisterRequest{EKCert: taken, DeviceID: "existing"}); err != nil {
		t.Fatal(err)
	}
	good1, good2, dup := selfSignedEK(t), selfSignedEK(t), selfSignedEK(t)
	weakKey, err := rsa.GenerateKey(rand.Reader, 1024) // no EK template
	if err != nil {
		t.Fatal(err)
	}
	weak, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(1)}, &x509.Certificate{SerialNumber: big.NewInt(1)}, weakKey.Public(), weakKey)
	if err != nil {
		t.Fatal(err)
	}
	entries := []api.EKRegisterRequest{
		{EKCert: good1, DeviceID: "ok-1", Group: "g", Line: 2},
		{EKCert: []byte("not a certificate"), DeviceID: "bad-cert", Line: 3},
		{EKCert: good2, DeviceID: "Bad_ID", Line: 4},
		{EKCert: taken, DeviceID: "thief", Line: 5},
		{EKCert: dup, DeviceID: "dup-1", Line: 6},
		{EKCert: dup, DeviceID: "dup-2", Line: 7},
		{EKCert: selfSignedEK(t), DeviceID: "existing", Line: 8},
		{EKCert: good2, DeviceID: "ok-2", Group: "bad group", Line: 9},
		{EKCert: weak, DeviceID: "weak", Line: 10},
	}
	_, err = g.Admin.ImportEKs(ctx, api.EKImportRequest{Entries: entries})
	var ie *adminclient.ImportError
	if !errors.As(err, &ie) || ie.Answer.Status != http.StatusUnprocessableEntity {
		t.Fatalf("import with bad lines: %v", err)
	}
	got := map[int]string{}
	for _, p := range ie.Problems {
		got[p.Line] = p.Code
	}
	want := map[int]string{3: "ek_cert_malformed", 4: "invalid_device_id", 5: "ek_already_registered", 7: "duplicate_entry",
		8: "device_has_ek", 9: "invalid_group", 10: "key_type"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("problems by line %v, want %v", got, want)
	}
	if _, err := g.Admin.Device(ctx, "ok-1"); !isCode(err, "not_found") {
		t.Fatalf("a refused import registered ok-1: %v", err)
	}

	// Dry run of a good import registers nothing; the real one all.
	goodEntries := []api.EKRegisterRequest{{EKCert: good1, DeviceID: "ok-1", Group: "g"}, {EKCert: good2, DeviceID: "ok-2", Group: "g"}, {EKCert: dup, DeviceID: "dup-1"}}
	if r, err := g.Admin.ImportEKs(ctx, api.EKImportRequest{Entries: goodEntries, DryRun: true}); err != nil || len(r.Registered) != 3 {
		t.Fatalf("dry run: %+v %v", r, err)
	}
	if _, err := g.Admin.Device(ctx, "ok-1"); !isCode(err, "not_found") {
		t.Fatalf("a dry run registered ok-1: %v", err)
	}
	r, err := g.Admin.ImportEKs(ctx, api.EKImportRequest{Entries: goodEntries})
	if err != nil || len(r.Registered) != 3 {
		t.Fatalf("import: %+v %v", r, err)
	}
	for _, e := range goodEntries {
		d, err := g.Admin.Device(ctx, e.DeviceID)
		if err != nil || d.State != string(fleet.StateRegistered) {
			t.Errorf("%s: %+v %v", e.DeviceID, d, err)
		}
	}
}

// ---- fuzzing the attestation request decoders ----

// FuzzTPMChallengeRequest feeds arbitrary bodies to the challenge handler:
// it never panics, never answers 5xx, and nothing is ever issued.
func FuzzTPMChallengeRequest(f *testing.F) {
	url, reg := directServer(f, nil, enroll.TPMPolicyAllowlist, nil)
	ek := selfSignedEK(f)
	cert, _ := x509.ParseCertificate(ek)
	if err := reg.RegisterEK(registry.EKRegistration{Fingerprint: api.EKFingerprint(cert.RawSubjectPublicKeyInfo), DeviceID: "fuzz-dev"}, "test"); err != nil {
		f.Fatal(err)
	}
	akKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ak := tpmkey.AKTemplate()
	ak.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: akKey.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: akKey.Y.FillBytes(make([]byte, 32))},
	})
	good, _ := json.Marshal(api.TPMChallengeRequest{DeviceID: "fuzz-dev", EKCert: ek, AKPublic: tpm2.Marshal(tpm2.New2B(ak))})
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"ek_cert":"AAAA","ak_public":"AAAA"}`))
	f.Add([]byte(`{"ek_cert":null,"ak_public":"` + strings.Repeat("A", 4000) + `"}`))
	f.Add([]byte(`[`))
	f.Fuzz(func(t *testing.T, body []byte) {
		code, _ := fuzzPost(t, url, api.PathTPMChallenge, body)
		// 503: the bounded challenge store is full, as it should be
		// after a flood of valid requests.
		if code >= 500 && code != http.StatusServiceUnavailable {
			t.Fatalf("status %d", code)
		}
		assertNothingIssued(t, reg)
	})
}

// FuzzTPMCompleteRequest feeds arbitrary completions, after a genuine
// challenge round trip for a registered EK: never a panic, a 5xx, or a
// certificate (the fuzzer cannot activate the credential or forge the AK's
// signature).
func FuzzTPMCompleteRequest(f *testing.F) {
	url, reg := directServer(f, nil, enroll.TPMPolicyAllowlist, nil)
	f.Add([]byte(`{"challenge_id":"00","secret":"AAAA","tls_public":"AAAA","certify_info":"AAAA","certify_signature":"AAAA","csr":"AAAA"}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"challenge_id":"` + strings.Repeat("a", 32) + `"}`))
	f.Add([]byte(`{"csr":"` + strings.Repeat("/", 300) + `"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		code, _ := fuzzPost(t, url, api.PathTPMComplete, body)
		if code >= 500 || code == http.StatusOK {
			t.Fatalf("status %d", code)
		}
		assertNothingIssued(t, reg)
	})
}

func fuzzPost(t *testing.T, url, path string, body []byte) (int, []byte) {
	resp, err := http.Post(url+path, "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func assertNothingIssued(t *testing.T, reg *registry.Registry) {
	ds, err := reg.Devices()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		if d.CurrentSerial != "" {
			t.Fatalf("device %s was issued %s", d.ID, d.CurrentSerial)
		}
	}
}

// ---- latency ----

// BenchmarkTPMEnrollment measures TPM enrollment latency per device, one
// swtpm per device, enrolled one after another against one gateway: end to
// end as the device sees it (both round trips, ActivateCredential, Certify
// and the CSR signature in the TPM, HTTPS) and server side as the handlers
// time themselves (fleetgate_tpm_enroll_seconds). Run it for 50 devices:
//
//	go test -run '^$' -bench BenchmarkTPMEnrollment -benchtime 50x ./enroll/
//
// The swtpms are started and registered (one bulk import) before the timer
// starts. No timing is asserted.
func BenchmarkTPMEnrollment(b *testing.B) {
	if testing.Short() {
		b.Skip("starts one swtpm per enrolled device")
	}
	if b.N > 500 {
		b.Fatalf("b.N = %d swtpm processes; use -benchtime 50x", b.N)
	}
	m, g := tpmGateway(b, "")
	n := b.N
	devs := make([]*tpmDevice, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range devs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			devs[i] = newTPMDevice(b, m, g.URL(), g.Roots(), fmt.Sprintf("bench-%03d", i))
		}()
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	entries := make([]api.EKRegisterRequest, n)
	for i, d := range devs {
		entries[i] = api.EKRegisterRequest{EKCert: d.keys.EK().CertDER, DeviceID: d.dev.ID(), Group: "bench"}
	}
	if _, err := g.Admin.ImportEKs(context.Background(), api.EKImportRequest{Entries: entries}); err != nil {
		b.Fatal(err)
	}

	e2e := make([]time.Duration, 0, n)
	b.ResetTimer()
	for _, d := range devs {
		start := time.Now()
		if err := d.dev.EnrollTPM(context.Background(), d.keys); err != nil {
			b.Fatal(err)
		}
		e2e = append(e2e, time.Since(start))
	}
	b.StopTimer()

	slices.Sort(e2e)
	pct := func(p float64) time.Duration { return e2e[min(len(e2e)-1, int(p*float64(len(e2e))))] }
	var total time.Duration
	for _, d := range e2e {
		total += d
	}
	metrics := g.Metrics(b)
	sum := func(phase, suffix string) float64 {
		var v float64
		key := `fleetgate_tpm_enroll_seconds_` + suffix + `{outcome="ok",phase="` + phase + `"} `
		for _, l := range strings.Split(metrics, "\n") {
			if strings.HasPrefix(l, key) {
				fmt.Sscan(strings.TrimPrefix(l, key), &v)
			}
		}
		return v
	}
	chS, chN := sum(phaseChallenge, "sum"), sum(phaseChallenge, "count")
	coS, coN := sum(phaseComplete, "sum"), sum(phaseComplete, "count")
	if chN != float64(n) || coN != float64(n) {
		b.Fatalf("handler counts %v/%v, want %d", chN, coN, n)
	}
	ms := func(s float64) float64 { return s * 1000 / float64(n) }
	b.ReportMetric(float64(total.Microseconds())/1000/float64(n), "e2e-ms/device")
	b.ReportMetric(ms(chS+coS), "server-ms/device")
	b.Logf("%d devices: end to end mean %v p50 %v p95 %v max %v; server side mean %.2f ms (challenge %.2f ms, complete %.2f ms)",
		n, total/time.Duration(n), pct(0.5), pct(0.95), e2e[len(e2e)-1], ms(chS+coS), ms(chS), ms(coS))
}

// Metric label values of fleetgate_tpm_enroll_seconds.
const (
	phaseChallenge = "challenge"
	phaseComplete  = "complete"
)
