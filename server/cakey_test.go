package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	xocsp "golang.org/x/crypto/ocsp"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore/keystoretest"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// initWithKey creates a data directory whose issuing CA key is created at
// ref (as `fleetgate init --ca-key REF` does).
func initWithKey(t testing.TB, ref string) string {
	t.Helper()
	k, err := keystore.Generate(ref)
	if err != nil {
		t.Fatalf("generate %s: %v", keystore.Redact(ref), err)
	}
	defer k.Close()
	dir := filepath.Join(t.TempDir(), "data")
	if _, err := server.Init(dir, ca.InitOptions{Options: ca.Options{Key: k}, TrustDomain: "test.fleetgate",
		Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ca.IssuingKeyFile)); err == nil {
		t.Fatal("init wrote ca/issuing.key although the key is in a store")
	}
	return dir
}

func TestServeRefusesABrokenCAKeyAtStart(t *testing.T) {
	tk := keystoretest.SoftHSM(t, "fleetgate")
	good := tk.URI("issuing")
	dir := initWithKey(t, good)
	other, err := keystore.Generate(tk.URI("other"))
	if err != nil {
		t.Fatal(err)
	}
	other.Close()

	start := func(ref, dataDir string) error {
		cfg := testenv.Config(t, testenv.Options{DataDir: dataDir})
		cfg.CAKey = ref
		s, err := server.New(cfg)
		if err == nil {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			s.Run(ctx)
		}
		return err
	}
	for _, c := range []struct{ name, ref, says string }{
		{"wrong PIN", strings.Replace(good, "pin-value="+tk.PIN, "pin-value=9999-nope", 1), "wrong PIN"},
		{"missing token", strings.Replace(good, "token=fleetgate", "token=gone", 1), "no such token"},
		{"missing module", strings.Replace(good, tk.Module, "/usr/lib/nope/libnope.so", 1), "PKCS#11 module /usr/lib/nope/libnope.so"},
		{"missing key", strings.Replace(good, "object=issuing", "object=nope", 1), "no private key"},
		{"key not matching the certificate", tk.URI("other"), "does not match ca/issuing.crt"},
		{"no ca_key, no file", "", "issuing.key: does not exist"},
		{"missing TPM", "tpm:handle=0x81000120;device=/nonexistent/tpmrm0", "no TPM at /nonexistent/tpmrm0"},
	} {
		err := start(c.ref, dir)
		if err == nil || !strings.Contains(err.Error(), c.says) {
			t.Errorf("%s: %v, want an error saying %q", c.name, err, c.says)
			continue
		}
		if strings.Contains(err.Error(), tk.PIN) || strings.Contains(err.Error(), "9999-nope") {
			t.Errorf("%s: the error shows the PIN: %v", c.name, err)
		}
		t.Logf("%s: %v", c.name, err)
	}
	if err := start(good, dir); err != nil {
		t.Fatalf("the right key: %v", err)
	}

	// A broker-only process signs nothing and never opens the key's store.
	cfg := testenv.Config(t, testenv.Options{DataDir: dir})
	cfg.Only, cfg.CAKey = server.OnlyBroker, "pkcs11:token=elsewhere;object=issuing?module-path=/nonexistent/libpkcs11.so"
	if s, err := server.New(cfg); err != nil {
		t.Fatalf("broker-only with the key's store on another host: %v", err)
	} else {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		s.Run(ctx)
	}

	// The default file key must be 0600.
	fdir := testenv.Init(t)
	if err := os.Chmod(filepath.Join(fdir, ca.IssuingKeyFile), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := start("", fdir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("group-readable key file: %v", err)
	}
}

// TestServeExitsOnABrokenCAKey runs the real binary: a wrong PIN stops
// `fleetgate serve` at once with a non-zero exit and a clear message.
func TestServeExitsOnABrokenCAKey(t *testing.T) {
	tk := keystoretest.SoftHSM(t, "fleetgate")
	dir := initWithKey(t, tk.URI("issuing"))
	bin := filepath.Join(t.TempDir(), "fleetgate")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/fleetgate/fleetgate/cmd/fleetgate").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	bad := strings.Replace(tk.URI("issuing"), "pin-value="+tk.PIN, "pin-value=0000-bad", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "serve", "--data-dir", dir, "--mqtt-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0",
		"--metrics-addr", "", "--ca-key", bad)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+tk.ConfPath)
	out, err := cmd.CombinedOutput()
	ee, ok := err.(*exec.ExitError)
	if !ok || ee.ExitCode() == 0 {
		t.Fatalf("serve with a wrong PIN: %v, want a non-zero exit\n%s", err, out)
	}
	if !strings.Contains(string(out), "wrong PIN") || strings.Contains(string(out), "0000-bad") || strings.Contains(string(out), tk.PIN) {
		t.Fatalf("serve's message: %s", out)
	}
	t.Logf("exit %d: %s", ee.ExitCode(), out)
}

func writePEM(t *testing.T, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// opensslStatus asks the server's OCSP listener with `openssl ocsp` and
// returns good, revoked or unknown; openssl must verify the response and
// its nonce.
func opensslStatus(t *testing.T, g *testenv.Gateway, leaf *x509.Certificate) string {
	t.Helper()
	dir := t.TempDir()
	out, err := exec.Command("openssl", "ocsp", "-issuer", writePEM(t, dir, "iss.pem", g.CA.Issuing()),
		"-cert", writePEM(t, dir, "leaf.pem", leaf), "-url", "http://"+g.Addrs.OCSP+"/ocsp",
		"-CAfile", writePEM(t, dir, "ca.pem", g.CA.Root, g.CA.Issuing())).CombinedOutput()
	s := string(out)
	if err != nil || !strings.Contains(s, "Response verify OK") || strings.Contains(s, "nonce") {
		t.Fatalf("openssl ocsp: %v\n%s", err, s)
	}
	for _, st := range []string{"good", "revoked", "unknown"} {
		if strings.Contains(s, "leaf.pem: "+st) {
			return st
		}
	}
	t.Fatalf("openssl ocsp said:\n%s", s)
	return ""
}

// TestCAKeyInHardwareEnrollsDevices enrolls devices with the issuing key
// in SoftHSM2 and in a TPM: the certificates verify, carry the OCSP URL,
// and OCSP (openssl) follows revocation and suspension at once.
func TestCAKeyInHardwareEnrollsDevices(t *testing.T) {
	keystoretest.OpenSSL(t)
	for _, store := range []string{"pkcs11", "tpm"} {
		t.Run(store, func(t *testing.T) {
			var ref string
			if store == "pkcs11" {
				ref = keystoretest.SoftHSM(t, "fleetgate").URI("issuing")
			} else {
				ref = "tpm:handle=0x81000130;device=" + keystoretest.TPM(t)
			}
			cfg := testenv.Config(t, testenv.Options{DataDir: initWithKey(t, ref)})
			cfg.CAKey, cfg.OCSPAddr = ref, "127.0.0.1:0"
			g := testenv.StartConfig(t, cfg)
			if strings.Contains(g.Logs.String(), "4711-pin") {
				t.Fatal("the PIN is in the log")
			}

			const n = 6
			devs := make([]*x509.Certificate, n)
			sdk := make([]*devicesdk.Device, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					sdk[i] = g.EnrollDevice(t, fmt.Sprintf("hw-%s-%d", store, i), "g")
					devs[i] = sdk[i].Leaf()
				})
			}
			wg.Wait()
			wantAIA := "http://localhost:" + g.Addrs.OCSP[strings.LastIndex(g.Addrs.OCSP, ":")+1:] + "/ocsp"
			inter := x509.NewCertPool()
			inter.AddCert(g.CA.Issuing())
			for _, d := range devs {
				if _, err := d.Verify(x509.VerifyOptions{Roots: g.Roots(), Intermediates: inter,
					KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
					t.Fatalf("device certificate signed in %s does not verify: %v", store, err)
				}
				if len(d.OCSPServer) != 1 || d.OCSPServer[0] != wantAIA {
					t.Fatalf("AIA OCSP %v, want %s", d.OCSPServer, wantAIA)
				}
			}
			ctx := context.Background()
			if st := opensslStatus(t, g, devs[0]); st != "good" {
				t.Fatalf("enrolled device: %s", st)
			}
			if _, err := g.Admin.DeviceAction(ctx, "hw-"+store+"-1", "revoke", "keyCompromise"); err != nil {
				t.Fatal(err)
			}
			if st := opensslStatus(t, g, devs[1]); st != "revoked" {
				t.Fatalf("revoked device: %s", st)
			}
			if _, err := g.Admin.DeviceAction(ctx, "hw-"+store+"-2", "suspend", "test"); err != nil {
				t.Fatal(err)
			}
			if st := opensslStatus(t, g, devs[2]); st != "revoked" {
				t.Fatalf("suspended device: %s", st)
			}
			// Signed by the CA but never recorded: unknown.
			k, _ := keystore.Generate(filepath.Join(t.TempDir(), "k"))
			stray, err := g.CA.IssueServer([]string{"stray"}, k.Public(), time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if st := opensslStatus(t, g, stray); st != "unknown" {
				t.Fatalf("never-issued serial: %s", st)
			}

			// The API's and the broker's certificate carry a staple.
			brokerTLS, err := sdk[0].TLSConfig("localhost")
			if err != nil {
				t.Fatal(err)
			}
			for addr, tc := range map[string]*tls.Config{g.Addrs.API: {RootCAs: g.Roots(), ServerName: "localhost"}, g.Addrs.MQTT: brokerTLS} {
				conn, err := tls.Dial("tcp", addr, tc)
				if err != nil {
					t.Fatal(err)
				}
				cs := conn.ConnectionState()
				conn.Close()
				r, err := xocsp.ParseResponseForCert(cs.OCSPResponse, cs.PeerCertificates[0], g.CA.Issuing())
				if err != nil || r.Status != xocsp.Good {
					t.Fatalf("staple on %s: %v", addr, err)
				}
			}

			// CRL and OCSP agree on every device certificate (a suspended
			// device's are on hold in OCSP, not on the CRL: suspension is
			// reversible).
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots(), ServerName: "localhost"}}}
			resp, err := hc.Get(g.URL() + api.PathCRL)
			if err != nil {
				t.Fatal(err)
			}
			crlDER, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			crl, err := x509.ParseRevocationList(crlDER)
			if err != nil {
				t.Fatal(err)
			}
			onCRL := map[string]bool{}
			for _, e := range crl.RevokedCertificateEntries {
				onCRL[e.SerialNumber.String()] = true
			}
			for i, d := range devs {
				reqDER, _ := xocsp.CreateRequest(d, g.CA.Issuing(), nil)
				resp, err := http.Post("http://"+g.Addrs.OCSP+"/ocsp", "application/ocsp-request", bytes.NewReader(reqDER))
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				r, err := xocsp.ParseResponseForCert(body, d, g.CA.Issuing())
				if err != nil {
					t.Fatal(err)
				}
				revoked := r.Status == xocsp.Revoked && r.RevocationReason != xocsp.CertificateHold
				if revoked != onCRL[d.SerialNumber.String()] || (i == 1) != revoked || (i == 2) != (r.RevocationReason == xocsp.CertificateHold && r.Status == xocsp.Revoked) {
					t.Fatalf("device %d: OCSP status %d reason %d, on CRL %v", i, r.Status, r.RevocationReason, onCRL[d.SerialNumber.String()])
				}
			}

			m := g.Metrics(t)
			for _, want := range []string{`fleetgate_ocsp_responses_total{status="good"} 5`, `fleetgate_ocsp_responses_total{status="revoked"} 4`,
				`fleetgate_pki_certificate_expiry_timestamp_seconds{kind="ocsp_signer"`, `fleetgate_pki_certificate_expiry_timestamp_seconds{kind="issuing"`,
				`fleetgate_pki_certificate_expiry_timestamp_seconds{kind="root"`, `fleetgate_pki_crl_next_update_timestamp_seconds `} {
				if !strings.Contains(m, want) {
					t.Errorf("metrics lack %s", want)
				}
			}
		})
	}
}

// BenchmarkEnrollWithCAKey measures token enrollments per second through
// the enrollment API with the issuing key in each store (8 concurrent).
func BenchmarkEnrollWithCAKey(b *testing.B) {
	for _, store := range []string{"file", "pkcs11", "tpm"} {
		b.Run(store, func(b *testing.B) {
			cfg := testenv.Config(b, testenv.Options{})
			switch store {
			case "pkcs11":
				ref := keystoretest.SoftHSM(b, "bench").URI("issuing")
				cfg = testenv.Config(b, testenv.Options{DataDir: initWithKey(b, ref)})
				cfg.CAKey = ref
			case "tpm":
				ref := "tpm:handle=0x81000140;device=" + keystoretest.TPM(b)
				cfg = testenv.Config(b, testenv.Options{DataDir: initWithKey(b, ref)})
				cfg.CAKey = ref
			}
			g := testenv.StartConfig(b, cfg)
			ctx := context.Background()
			devs := make([]*devicesdk.Device, b.N)
			tokens := make([]string, b.N)
			for i := range b.N {
				id := fmt.Sprintf("bench-%d", i)
				devs[i], tokens[i] = g.Device(b, id), g.Token(b, id, "g", time.Hour)
			}
			b.ResetTimer()
			var wg sync.WaitGroup
			next := make(chan int, b.N)
			for i := range b.N {
				next <- i
			}
			close(next)
			for range 8 {
				wg.Go(func() {
					for i := range next {
						if err := devs[i].EnrollWithToken(ctx, tokens[i]); err != nil {
							b.Error(err)
						}
					}
				})
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "enrollments/s")
		})
	}
}
