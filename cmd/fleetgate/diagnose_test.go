package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestDiagnoseCommand: `fleetgate diagnose --connect` on a good device
// certificate says ACCEPTED, the live attempt is accepted, and the
// mosquitto_pub and openssl commands it prints, run as printed, connect;
// once the device is suspended it says REFUSED with the broker's reason,
// exits 1, and the printed mosquitto_pub is refused too. --device reads
// the current certificate from the registry.
func TestDiagnoseCommand(t *testing.T) {
	for _, tool := range []string{"mosquitto_pub", "openssl"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
				t.Fatalf("%s not installed", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	g := testenv.Start(t, testenv.Options{})
	d := g.EnrollDevice(t, "sensor-1", "lab")
	cfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "device.crt"), filepath.Join(dir, "device.key")
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	args := []string{"diagnose", "--cert", certFile, "--key", keyFile, "--connect", "--mqtt", g.Addrs.MQTT}
	printed := func(out, prefix string) string {
		for _, l := range strings.Split(out, "\n") {
			if l = strings.TrimSpace(l); strings.HasPrefix(l, prefix) {
				return l
			}
		}
		t.Fatalf("no %s command in:\n%s", prefix, out)
		return ""
	}
	sh := func(line string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "sh", "-c", line).CombinedOutput()
		return string(out), err
	}

	out, _, err := runCLI(t, g, args...)
	if err != nil || !strings.Contains(out, "verdict: ACCEPTED") || !strings.Contains(out, "live attempt: accepted") {
		t.Fatalf("good certificate: %v\n%s", err, out)
	}
	if o, err := sh(printed(out, "mosquitto_pub ")); err != nil {
		t.Fatalf("the printed mosquitto_pub failed on a good certificate: %v\n%s", err, o)
	}
	if o, err := sh(printed(out, "openssl s_client ")); err != nil || !strings.Contains(o, "CONNECTION ESTABLISHED") {
		t.Fatalf("the printed openssl s_client: %v\n%s", err, o)
	}

	if _, err := g.Admin.DeviceAction(context.Background(), "sensor-1", "suspend", "test"); err != nil {
		t.Fatal(err)
	}
	out, _, err = runCLI(t, g, args...)
	if !errors.Is(err, errRefused) || !strings.Contains(out, `verdict: REFUSED (the broker logs and counts reason "suspended"`) ||
		!strings.Contains(out, "live attempt: refused at the tls stage") || !strings.Contains(out, "fleetgate devices resume sensor-1") {
		t.Fatalf("suspended device: %v\n%s", err, out)
	}
	if o, err := sh(printed(out, "mosquitto_pub ")); err == nil {
		t.Fatalf("the printed mosquitto_pub connected with a suspended device's certificate:\n%s", o)
	}
	t.Logf("%s", out)
	out, _, err = runCLI(t, g, append(args, "--json")...)
	var rep struct {
		Accepted bool   `json:"accepted"`
		Reason   string `json:"reason"`
		Problem  string `json:"problem"`
		Live     struct {
			Accepted bool
			Stage    string
		} `json:"live"`
	}
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil || !errors.Is(err, errRefused) || rep.Accepted || rep.Reason != "suspended" ||
		rep.Problem != "device_suspended" || rep.Live.Accepted || rep.Live.Stage != "tls" {
		t.Fatalf("--json: %v %v %+v\n%s", err, jerr, rep, out)
	}
	out, _, err = runCLI(t, g, "diagnose", "--device", "sensor-1")
	if !errors.Is(err, errRefused) || !strings.Contains(out, "the registry's current certificate") || !strings.Contains(out, "suspended") {
		t.Fatalf("--device: %v\n%s", err, out)
	}
}
