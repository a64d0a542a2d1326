// Package e2e runs fleetgate as its users do: the real binaries as
// processes, real TLS, real badger data directories, and clients nobody here
// wrote (mosquitto_pub/sub, openssl s_client).
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

type env struct {
	t       testing.TB
	dataDir string
	srv     *server
	roots   *x509.CertPool
}

func (e *env) admin(args ...string) string {
	e.t.Helper()
	args = append(args, "--data-dir", e.dataDir, "--server", "https://"+e.srv.Addrs.API)
	out, err := run(e.t, bin(e.t, "fleetgate"), args...)
	if err != nil {
		e.t.Fatalf("fleetgate %v: %v\n%s", args, err, out)
	}
	return out
}

func (e *env) token(id, group string) string {
	out := e.admin("tokens", "create", "--device", id, "--group", group, "--ttl", "1h")
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "fgt_") {
			return strings.TrimSpace(l)
		}
	}
	e.t.Fatalf("no token in output:\n%s", out)
	return ""
}

func (e *env) enroll(id, group string) (*devicesdk.Device, string) {
	e.t.Helper()
	dir := filepath.Join(e.t.TempDir(), id)
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		e.t.Fatal(err)
	}
	d, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: "https://" + e.srv.Addrs.API, RootCAs: e.roots})
	if err != nil {
		e.t.Fatal(err)
	}
	if err := d.EnrollWithToken(context.Background(), e.token(id, group)); err != nil {
		e.t.Fatal(err)
	}
	return d, dir
}

func initData(t testing.TB) *env {
	dataDir := filepath.Join(t.TempDir(), "data")
	out, err := run(t, bin(t, "fleetgate"), "init", "--data-dir", dataDir, "--trust-domain", "e2e.fleetgate")
	if err != nil {
		t.Fatalf("init: %v\n%s", err, out)
	}
	roots := x509.NewCertPool()
	b, err := os.ReadFile(filepath.Join(dataDir, ca.RootCertFile))
	if err != nil || !roots.AppendCertsFromPEM(b) {
		t.Fatal("no root CA after init", err)
	}
	return &env{t: t, dataDir: dataDir, roots: roots}
}

func TestInitWritesKeys0600AndNeverOverwrites(t *testing.T) {
	e := initData(t)
	for _, k := range []string{ca.RootKeyFile, ca.IssuingKeyFile, ca.ServerKeyFile, ca.OperatorKeyFile} {
		fi, err := os.Stat(filepath.Join(e.dataDir, k))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", k, fi.Mode().Perm())
		}
	}
	before := snapshot(t, e.dataDir)
	out, err := run(t, bin(t, "fleetgate"), "init", "--data-dir", e.dataDir)
	if err != nil {
		t.Fatalf("second init failed: %v\n%s", err, out)
	}
	if !strings.Contains(out, "already holds a CA") {
		t.Errorf("second init did not say the CA exists:\n%s", out)
	}
	if after := snapshot(t, e.dataDir); after != before {
		t.Error("second init changed the CA files")
	}
	// openssl agrees the chain is sound.
	if out, err := run(t, "openssl", "verify", "-CAfile", filepath.Join(e.dataDir, ca.RootCertFile), filepath.Join(e.dataDir, ca.IssuingCertFile)); err != nil {
		t.Errorf("openssl verify issuing CA: %v\n%s", err, out)
	}
}

func snapshot(t *testing.T, dir string) string {
	var b strings.Builder
	for _, f := range []string{ca.RootCertFile, ca.RootKeyFile, ca.IssuingCertFile, ca.IssuingKeyFile} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		b.Write(data)
	}
	return b.String()
}

func TestEndToEndWithProcessesAndRestart(t *testing.T) {
	e := initData(t)
	e.srv = serve(t, e.dataDir)
	ctx := context.Background()

	// A backend service with a certificate from `fleetgate services issue`.
	svcDir := filepath.Join(t.TempDir(), "backend")
	e.admin("services", "issue", "--name", "backend", "--out", svcDir)
	fi, err := os.Stat(filepath.Join(svcDir, "key.pem"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("service key: %v %v", err, fi)
	}
	svcCert, err := tls.LoadX509KeyPair(filepath.Join(svcDir, "cert.pem"), filepath.Join(svcDir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	recv := newCollector()
	svc := connectPaho(t, e.srv.Addrs.MQTT, "backend", svcCert, e.roots)
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, recv.handle); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("service subscribe: %v", tok.Error())
	}

	d1, _ := e.enroll("therm-1", "floor-1")
	d2, _ := e.enroll("therm-2", "floor-1")
	opts := devicesdk.ConnectOptions{BrokerAddr: e.srv.Addrs.MQTT, ServerName: "localhost"}
	c1, err := d1.Connect(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c1.PublishTelemetry(ctx, "temp", 1, []byte("20.1")); err != nil {
		t.Fatal(err)
	}
	recv.wait(t, "devices/therm-1/telemetry/temp", "20.1")

	// Publishing into another device's topic is not delivered; subscribing
	// to the whole fleet is refused.
	_ = c1.Publish(ctx, "devices/therm-2/telemetry/temp", 0, false, []byte("forged"))
	if err := c1.Subscribe(ctx, "devices/#", 1, func(devicesdk.Message) {}); err == nil {
		t.Error("device subscribed to devices/#")
	}
	c1.Close()

	// Restart on the same data directory: same CA, devices reconnect.
	rootBefore, _ := os.ReadFile(filepath.Join(e.dataDir, ca.RootCertFile))
	stop(t, e.srv)
	e.srv = serve(t, e.dataDir)
	rootAfter, _ := os.ReadFile(filepath.Join(e.dataDir, ca.RootCertFile))
	if !bytes.Equal(rootBefore, rootAfter) {
		t.Fatal("root CA changed across restart")
	}
	recv2 := newCollector()
	svc2 := connectPaho(t, e.srv.Addrs.MQTT, "backend", svcCert, e.roots)
	if tok := svc2.Subscribe("devices/+/telemetry/#", 1, recv2.handle); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("service subscribe after restart: %v", tok.Error())
	}
	opts.BrokerAddr = e.srv.Addrs.MQTT
	for _, d := range []*devicesdk.Device{d1, d2} {
		c, err := d.Connect(ctx, opts)
		if err != nil {
			t.Fatalf("%s reconnect after restart: %v", d.ID(), err)
		}
		if err := c.PublishTelemetry(ctx, "temp", 1, []byte("after-restart")); err != nil {
			t.Fatal(err)
		}
		recv2.wait(t, "devices/"+d.ID()+"/telemetry/temp", "after-restart")
		c.Close()
	}
	if got := recv.get("devices/therm-2/telemetry/temp"); len(got) != 0 {
		t.Errorf("forged message delivered: %v", got)
	}
	// The registry survived too: the devices are listed as enrolled by token.
	out := e.admin("devices", "list")
	for _, id := range []string{"therm-1", "therm-2"} {
		if !strings.Contains(out, id) || !strings.Contains(out, "token") {
			t.Errorf("devices list after restart lacks %s:\n%s", id, out)
		}
	}
}

func TestInteropWithMosquittoClientsAndOpenSSL(t *testing.T) {
	for _, tool := range []string{"mosquitto_pub", "mosquitto_sub", "openssl"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
				t.Fatalf("%s not installed", tool)
			}
			t.Skipf("%s not installed (make test installs it)", tool)
		}
	}
	e := initData(t)
	e.srv = serve(t, e.dataDir)
	_, dir := e.enroll("probe-1", "lab")
	e.enroll("probe-2", "lab")
	svcDir := filepath.Join(t.TempDir(), "backend")
	e.admin("services", "issue", "--name", "backend", "--out", svcDir)
	_, port, _ := strings.Cut(e.srv.Addrs.MQTT, ":")
	common := []string{"-h", "localhost", "-p", port, "--cafile", filepath.Join(e.dataDir, ca.RootCertFile), "-V", "mqttv5"}
	devArgs := append(append([]string{}, common...), "--cert", filepath.Join(dir, devicesdk.ChainFile), "--key", filepath.Join(dir, devicesdk.SoftKeyFile), "-i", "probe-1")
	svcArgs := append(append([]string{}, common...), "--cert", filepath.Join(svcDir, "cert.pem"), "--key", filepath.Join(svcDir, "key.pem"), "-i", "backend")

	// mosquitto_sub as the backend waits for one message on the fleet filter.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sub := exec.CommandContext(ctx, "mosquitto_sub", append(append([]string{}, svcArgs...), "-t", "devices/+/telemetry/#", "-C", "1", "-v", "-q", "1")...)
	var subOut bytes.Buffer
	sub.Stdout, sub.Stderr = &subOut, &subOut
	if err := sub.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if sub.ProcessState == nil {
			_ = sub.Process.Kill()
			_ = sub.Wait()
		}
	})
	// Publish until the subscriber (which may still be connecting) got one.
	done := make(chan error, 1)
	go func() { done <- sub.Wait() }()
	deadline := time.After(20 * time.Second)
publish:
	for {
		if out, err := run(t, "mosquitto_pub", append(append([]string{}, devArgs...), "-t", "devices/probe-1/telemetry/t", "-m", "from-mosquitto", "-q", "1")...); err != nil {
			t.Fatalf("mosquitto_pub on own topic failed: %v\n%s", err, out)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("mosquitto_sub: %v\n%s", err, subOut.String())
			}
			break publish
		case <-time.After(300 * time.Millisecond):
		case <-deadline:
			t.Fatalf("mosquitto_sub received nothing:\n%s", subOut.String())
		}
	}
	if !strings.Contains(subOut.String(), "devices/probe-1/telemetry/t from-mosquitto") {
		t.Errorf("mosquitto_sub output: %q", subOut.String())
	}

	// On another device's topic: the QoS 1 publish is refused (MQTT 5
	// PUBACK 0x87), and a subscription is refused (SUBACK 0x87).
	out, err := run(t, "mosquitto_pub", append(append([]string{}, devArgs...), "-t", "devices/probe-2/commands/x", "-m", "forged", "-q", "1")...)
	if !strings.Contains(strings.ToLower(out), "not authori") {
		t.Errorf("mosquitto_pub to another device's topic was not refused (err %v): %q", err, out)
	}
	out, err = run(t, "mosquitto_sub", append(append([]string{}, devArgs...), "-t", "devices/probe-2/commands/#", "-C", "1", "-W", "5")...)
	// mosquitto_sub 2.0 prints the refusal and exits; it receives nothing.
	if !strings.Contains(out, "All subscription requests were denied") {
		t.Errorf("mosquitto_sub on another device's topic was not refused (err %v): %q", err, out)
	}

	// openssl s_client without a client certificate cannot complete the
	// handshake.
	// -ign_eof: in TLS 1.3 the client's side of the handshake completes
	// before the server's alert; keep reading to see it.
	sctx, scancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer scancel()
	cmd := exec.CommandContext(sctx, "openssl", "s_client", "-connect", e.srv.Addrs.MQTT, "-tls1_3", "-CAfile", filepath.Join(e.dataDir, ca.RootCertFile), "-servername", "localhost", "-ign_eof")
	cmd.Stdin = strings.NewReader("")
	b, _ := cmd.CombinedOutput()
	o := strings.ToLower(string(b))
	if !strings.Contains(o, "certificate required") {
		t.Errorf("openssl s_client without certificate did not fail with an alert:\n%s", b)
	}
}

type collector struct {
	mu  sync.Mutex
	got map[string][]string
}

func newCollector() *collector { return &collector{got: map[string][]string{}} }

func (c *collector) handle(_ paho.Client, m paho.Message) {
	c.mu.Lock()
	c.got[m.Topic()] = append(c.got[m.Topic()], string(m.Payload()))
	c.mu.Unlock()
}

func (c *collector) get(topic string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got[topic]...)
}

func (c *collector) wait(t *testing.T, topic, payload string) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, func() error {
		for _, p := range c.get(topic) {
			if p == payload {
				return nil
			}
		}
		return os.ErrNotExist
	})
}

func connectPaho(t testing.TB, addr, id string, cert tls.Certificate, roots *x509.CertPool) paho.Client {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + addr).SetClientID(id).
		SetTLSConfig(&tls.Config{RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{cert}}).
		SetCleanSession(true).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("%s connect: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c
}

func loadPair(t *testing.T, dir string) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}
