package broker_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// mosq runs mosquitto_pub/mosquitto_sub (MQTT 5) against the gateway with
// a client certificate.
type mosq struct {
	g           *testenv.Gateway
	host, port  string
	cafile      string
	certDir     string
	certs, keys map[string]string
}

func newMosq(t *testing.T, g *testenv.Gateway) *mosq {
	t.Helper()
	for _, bin := range []string{"mosquitto_pub", "mosquitto_sub"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed", bin)
		}
	}
	_, port, err := net.SplitHostPort(g.Addrs.MQTT)
	if err != nil {
		t.Fatal(err)
	}
	return &mosq{g: g, host: "localhost", port: port, cafile: filepath.Join(g.DataDir, ca.RootCertFile),
		certDir: t.TempDir(), certs: map[string]string{}, keys: map[string]string{}}
}

// identity writes name's certificate chain and key as PEM files.
func (m *mosq) identity(t *testing.T, name string, c tls.Certificate) {
	t.Helper()
	var chain []byte
	for _, der := range c.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	key, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	m.certs[name] = filepath.Join(m.certDir, name+".crt")
	m.keys[name] = filepath.Join(m.certDir, name+".key")
	if err := os.WriteFile(m.certs[name], chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.keys[name], pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func (m *mosq) args(name string, extra ...string) []string {
	return append([]string{"-V", "mqttv5", "-h", m.host, "-p", m.port, "--cafile", m.cafile,
		"--cert", m.certs[name], "--key", m.keys[name], "-i", name}, extra...)
}

// pub publishes one QoS 1 message; expiry 0: none.
func (m *mosq) pub(t *testing.T, name, topic, payload string, retain bool, expiry int) {
	t.Helper()
	a := m.args(name, "-q", "1", "-t", topic, "-m", payload)
	if retain {
		a = append(a, "-r")
	}
	if expiry > 0 {
		a = append(a, "-D", "publish", "message-expiry-interval", strconv.Itoa(expiry))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mosquitto_pub", a...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_pub %s: %v\n%s", topic, err, out)
	}
}

// subUntil runs mosquitto_sub with args and returns the lines
// "<topic> <expiry>" it prints, up to and including the first on a topic
// ending in marker; it stops mosquitto_sub then.
func (m *mosq) subUntil(t *testing.T, name, marker string, extra ...string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "mosquitto_sub", m.args(name, append([]string{"-q", "1", "-F", "%t %E"}, extra...)...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var lines []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		lines = append(lines, line)
		if topic, _, _ := strings.Cut(line, " "); strings.HasSuffix(topic, marker) {
			return lines
		}
	}
	t.Fatalf("mosquitto_sub ended before %s: %v; got %q\n%s", marker, ctx.Err(), lines, stderr.String())
	return nil
}

// expiryOf returns the expiry printed for topic; ok false if topic is not
// among the lines.
func expiryOf(lines []string, topic string) (e int, ok bool) {
	for _, l := range lines {
		if tp, v, _ := strings.Cut(l, " "); tp == topic {
			e, _ = strconv.Atoi(strings.TrimSpace(v))
			return e, true
		}
	}
	return 0, false
}

// MQTT 5 Message Expiry Interval, with mosquitto's clients: a message
// queued for an offline persistent session and a retained message are not
// delivered once their interval has passed ([MQTT-3.3.2-5]); one still
// valid is delivered with the interval decremented by the time it waited
// ([MQTT-3.3.2-6]). The broker's clock is the real one (mochi keeps
// seconds), so the test sleeps past the short expiry; it asserts outcomes
// only.
func TestMessageExpiryQueuedAndRetained(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DataDir: testenv.Init(t)})
	m := newMosq(t, g)
	m.identity(t, "exp-sink", g.Service(t, "exp-sink"))
	m.identity(t, "exp-cmd", g.Service(t, "exp-cmd"))
	for _, id := range []string{"exp-1", "exp-2", "exp-z"} {
		m.identity(t, id, certOf(t, g.EnrollDevice(t, id, "lab")))
	}

	// A backend's persistent session, offline.
	m.subUntilSubscribed(t, "exp-sink", "-c", "-x", "3600", "-t", "devices/exp-1/commands/#")

	m.pub(t, "exp-cmd", "devices/exp-1/commands/short", "s", false, 2)
	m.pub(t, "exp-cmd", "devices/exp-1/commands/long", "l", false, 60)
	m.pub(t, "exp-1", "devices/exp-1/state", "s", true, 2)
	m.pub(t, "exp-2", "devices/exp-2/state", "l", true, 60)
	time.Sleep(3500 * time.Millisecond) // past the 2 s expiry
	// Markers, published later than everything above, end each read.
	m.pub(t, "exp-cmd", "devices/exp-1/commands/marker", "m", false, 0)
	m.pub(t, "exp-z", "devices/exp-z/state", "m", true, 0)

	queued := m.subUntil(t, "exp-sink", "/commands/marker", "-c", "-x", "3600", "-t", "devices/exp-1/commands/#")
	if _, ok := expiryOf(queued, "devices/exp-1/commands/short"); ok {
		t.Errorf("expired queued message delivered: %q", queued)
	}
	if e, ok := expiryOf(queued, "devices/exp-1/commands/long"); !ok || e <= 0 || e > 57 {
		t.Errorf("queued message with expiry 60, 3.5 s later: expiry %d (delivered %v), want 1..57: %q", e, ok, queued)
	}

	retained := m.subUntil(t, "exp-sink", "devices/exp-z/state",
		"-t", "devices/exp-1/state", "-t", "devices/exp-2/state", "-t", "devices/exp-z/state")
	if _, ok := expiryOf(retained, "devices/exp-1/state"); ok {
		t.Errorf("expired retained message delivered: %q", retained)
	}
	if e, ok := expiryOf(retained, "devices/exp-2/state"); !ok || e <= 0 || e > 57 {
		t.Errorf("retained message with expiry 60, 3.5 s later: expiry %d (delivered %v), want 1..57: %q", e, ok, retained)
	}
	if e, ok := expiryOf(retained, "devices/exp-z/state"); !ok || e != 0 {
		t.Errorf("message without expiry delivered with expiry %d (delivered %v): %q", e, ok, retained)
	}
}

// subUntilSubscribed creates a session's subscriptions and disconnects.
func (m *mosq) subUntilSubscribed(t *testing.T, name string, extra ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "mosquitto_sub", m.args(name, append([]string{"-q", "1", "-E"}, extra...)...)...).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_sub -E: %v\n%s", err, out)
	}
}
