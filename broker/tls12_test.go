package broker_test

import (
	"context"
	"crypto/tls"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func startTLS12(t *testing.T) *testenv.Gateway {
	t.Helper()
	cfg := testenv.Config(t, testenv.Options{})
	cfg.MinTLS = "1.2"
	return testenv.StartConfig(t, cfg)
}

// tlsHandshake runs a TLS handshake with cert under cfg's version and suite
// limits; the broker's verdict on the certificate arrives with the first
// read (TLS 1.3) or in the handshake (TLS 1.2). It returns the state of an
// admitted connection.
func tlsHandshake(g *testenv.Gateway, cert tls.Certificate, cfg *tls.Config) (tls.ConnectionState, error) {
	cfg.RootCAs, cfg.ServerName = g.Roots(), "localhost"
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	c, err := tls.Dial("tcp", g.Addrs.MQTT, cfg)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err != nil && !os.IsTimeout(err) {
		return tls.ConnectionState{}, err
	}
	return c.ConnectionState(), nil
}

func requireTool(t *testing.T, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatalf("%s not installed", name)
		}
		t.Skipf("%s not installed", name)
	}
}

// TestTLS12ForConstrainedDevices: with --min-tls 1.2 a client limited to
// TLS 1.2 connects (Go, openssl s_client -tls1_2, mosquitto_pub
// --tls-version tlsv1.2) with one of the curated ECDHE-ECDSA AEAD suites;
// CBC suites and TLS 1.1 are refused; a revoked device is refused on TLS
// 1.2 as on 1.3, its live session closed and a resumed session refused. By default (1.3) a TLS 1.2
// client is refused.
func TestTLS12ForConstrainedDevices(t *testing.T) {
	g13 := testenv.Start(t, testenv.Options{})
	cert13 := certOf(t, g13.EnrollDevice(t, "old-13", "lab"))
	if _, err := tlsHandshake(g13, cert13, &tls.Config{MaxVersion: tls.VersionTLS12}); err == nil {
		t.Error("TLS 1.2 client admitted by the default (1.3 only) broker")
	}

	g := startTLS12(t)
	w := watch(t, g)
	dev := g.EnrollDevice(t, "mbed-1", "lab")
	cert := certOf(t, dev)

	// A Go client limited to TLS 1.2, over MQTT.
	st, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2 client refused: %v", err)
	}
	if st.Version != tls.VersionTLS12 || !slices.Contains(broker.TLS12CipherSuites, st.CipherSuite) {
		t.Errorf("negotiated %s %s", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite))
	}
	lost := make(chan error, 1)
	c, err := g.MQTT(t, "mbed-1", &cert, func(o *paho.ClientOptions) {
		o.TLSConfig.MaxVersion = tls.VersionTLS12
		o.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	})
	if err != nil {
		t.Fatalf("MQTT over TLS 1.2: %v", err)
	}
	c.Publish("devices/mbed-1/telemetry/t", 1, false, "over-tls12").WaitTimeout(10 * time.Second)
	w.waitFor(t, "devices/mbed-1/telemetry/t over-tls12")
	// TLS 1.3 clients keep TLS 1.3 and its post-quantum hybrid key
	// exchange on a broker that also accepts 1.2.
	if st, err := tlsHandshake(g, cert, &tls.Config{}); err != nil || st.Version != tls.VersionTLS13 || st.CurveID != tls.X25519MLKEM768 {
		t.Errorf("TLS 1.3 client on a 1.2 broker: %s %v: %v", tls.VersionName(st.Version), st.CurveID, err)
	}
	// Every suite of the list, each alone.
	for _, s := range broker.TLS12CipherSuites {
		if st, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{s}}); err != nil || st.CipherSuite != s {
			t.Errorf("suite %s: %v", tls.CipherSuiteName(s), err)
		}
	}
	// CBC, RSA key exchange and TLS 1.1: refused.
	for name, cfg := range map[string]*tls.Config{
		"ECDHE-ECDSA AES-128-CBC-SHA256": {MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256}},
		"ECDHE-ECDSA AES-128-CBC-SHA":    {MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA}},
		"RSA AES-128-GCM":                {MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}},
		"TLS 1.1":                        {MinVersion: tls.VersionTLS11, MaxVersion: tls.VersionTLS11},
	} {
		if _, err := tlsHandshake(g, cert, cfg); err == nil {
			t.Errorf("%s admitted", name)
		}
	}

	// openssl s_client -tls1_2, and a CBC suite.
	requireTool(t, "openssl")
	certFile, keyFile := writePEMs(t, cert)
	rootFile := filepath.Join(g.DataDir, ca.RootCertFile)
	sclient := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "openssl", append([]string{"s_client", "-connect", g.Addrs.MQTT, "-servername", "localhost",
			"-CAfile", rootFile, "-cert", certFile, "-key", keyFile, "-verify_return_error", "-brief"}, args...)...)
		cmd.Stdin = strings.NewReader("")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := sclient("-tls1_2")
	if err != nil || !strings.Contains(out, "Protocol version: TLSv1.2") || !strings.Contains(out, "Ciphersuite: ECDHE-ECDSA-") {
		t.Errorf("openssl s_client -tls1_2: %v\n%s", err, out)
	}
	if out, err := sclient("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA"); err == nil || strings.Contains(out, "Protocol version: TLSv1.2") {
		t.Errorf("openssl s_client with CBC suites admitted:\n%s", out)
	}

	// mosquitto_pub --tls-version tlsv1.2
	requireTool(t, "mosquitto_pub")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mosquitto_pub", "--tls-version", "tlsv1.2", "-h", "127.0.0.1", "-p", portOf(g.Addrs.MQTT),
		"--cafile", rootFile, "--cert", certFile, "--key", keyFile, "--insecure",
		"-i", "mbed-1", "-q", "1", "-t", "devices/mbed-1/telemetry/t", "-m", "mosquitto-tls12").CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub --tls-version tlsv1.2: %v\n%s", err, out)
	}
	w.waitFor(t, "devices/mbed-1/telemetry/t mosquitto-tls12")

	// Revocation holds on TLS 1.2 as on 1.3, a resumed session included:
	// a session cached before the revocation does not bring it back.
	cache := tls.NewLRUClientSessionCache(4)
	if _, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12, ClientSessionCache: cache}); err != nil {
		t.Fatal(err)
	}
	if st, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12, ClientSessionCache: cache}); err != nil || !st.DidResume {
		t.Fatalf("TLS 1.2 session not resumed before the revocation (resumed %v): %v", st.DidResume, err)
	}
	if _, err := g.Admin.DeviceAction(context.Background(), "mbed-1", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	select { // the live TLS 1.2 session is closed
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Error("revoked device's TLS 1.2 session not closed")
	}
	if _, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12, ClientSessionCache: cache}); err == nil {
		t.Error("revoked device admitted on a resumed TLS 1.2 session")
	}
	if _, err := tlsHandshake(g, cert, &tls.Config{MaxVersion: tls.VersionTLS12}); err == nil {
		t.Error("revoked device admitted over TLS 1.2")
	}
	if out, err := sclient("-tls1_2"); err == nil {
		t.Errorf("openssl s_client -tls1_2 with a revoked certificate admitted:\n%s", out)
	}
}
