package broker_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// v5Client is a paho.golang (MQTT 5) client on the test gateway.
type v5Client struct {
	*paho5.Client
	ack  *paho5.Connack
	disc chan *paho5.Disconnect
}

func dialPaho5(t *testing.T, g *testenv.Gateway, id string, cert tls.Certificate, cp *paho5.Connect) (*v5Client, error) {
	t.Helper()
	conn, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { conn.Close() })
	v := &v5Client{disc: make(chan *paho5.Disconnect, 1)}
	v.Client = paho5.NewClient(paho5.ClientConfig{Conn: conn,
		OnServerDisconnect: func(d *paho5.Disconnect) {
			select {
			case v.disc <- d:
			default:
			}
		},
		OnClientError: func(error) {}})
	if cp == nil {
		cp = &paho5.Connect{}
	}
	cp.ClientID, cp.KeepAlive = id, 30
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v.ack, err = v.Connect(ctx, cp)
	if err != nil {
		return nil, err
	}
	return v, nil
}

// publish sends a QoS 1 publish with an optional alias and returns the
// PUBACK reason code.
func (v *v5Client) publish(t *testing.T, topic string, alias uint16, payload string) byte {
	t.Helper()
	p := &paho5.Publish{Topic: topic, QoS: 1, Payload: []byte(payload)}
	if alias > 0 {
		p.Properties = &paho5.PublishProperties{TopicAlias: &alias}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := v.Publish(ctx, p)
	if r == nil {
		t.Fatalf("publish %q alias %d: no PUBACK: %v", topic, alias, err)
	}
	return r.ReasonCode
}

// watcher records every message a service receives on devices/#.
type watcher struct {
	mu  sync.Mutex
	got []string // "topic payload"
}

func watch(t *testing.T, g *testenv.Gateway) *watcher {
	t.Helper()
	w := &watcher{}
	cert := g.Service(t, "watch")
	c, err := g.MQTT(t, "watch", &cert)
	if err != nil {
		t.Fatal(err)
	}
	if tok := c.Subscribe("devices/#", 1, func(_ paho.Client, m paho.Message) {
		w.mu.Lock()
		w.got = append(w.got, m.Topic()+" "+string(m.Payload()))
		w.mu.Unlock()
	}); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("watch subscribe: %v", tok.Error())
	}
	return w
}

func (w *watcher) all() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.got...)
}

// waitFor waits until "topic payload" arrived.
func (w *watcher) waitFor(t *testing.T, msg string) {
	t.Helper()
	testenv.Eventually(t, 10*time.Second, func() error {
		for _, m := range w.all() {
			if m == msg {
				return nil
			}
		}
		return fmt.Errorf("%q not received; got %q", msg, w.all())
	})
}

// withPayload returns the received messages carrying payload.
func (w *watcher) withPayload(payload string) []string {
	var out []string
	for _, m := range w.all() {
		if strings.HasSuffix(m, " "+payload) {
			out = append(out, m)
		}
	}
	return out
}

func TestTopicAliasesAreResolvedBeforeTheACLCheck(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	w := watch(t, g)
	dev := certOf(t, g.EnrollDevice(t, "alias-1", "lab"))
	c, err := dialPaho5(t, g, "alias-1", dev, nil)
	if err != nil {
		t.Fatal(err)
	}
	// CONNACK announces the limits the broker enforces.
	if p := c.ack.Properties; p == nil || p.TopicAliasMaximum == nil || *p.TopicAliasMaximum != 16 {
		t.Errorf("CONNACK Topic Alias Maximum: %+v", c.ack.Properties)
	}
	if p := c.ack.Properties; p == nil || p.MaximumPacketSize == nil || *p.MaximumPacketSize != 256<<10 {
		t.Errorf("CONNACK Maximum Packet Size: %+v", c.ack.Properties)
	}

	// Alias set with a permitted topic, then alias-only publishes: all on
	// the real topic.
	const own = "devices/alias-1/telemetry/a"
	if rc := c.publish(t, own, 1, "set-1"); rc != 0 {
		t.Fatalf("publish setting alias 1: reason 0x%02x", rc)
	}
	for _, p := range []string{"only-1", "only-2"} {
		if rc := c.publish(t, "", 1, p); rc != 0 {
			t.Fatalf("alias-only publish %s: reason 0x%02x", p, rc)
		}
		w.waitFor(t, own+" "+p)
	}
	w.waitFor(t, own+" set-1")

	// An alias mapped to a topic the device may not publish: refused, set
	// or used.
	const foreign = "devices/victim/commands/unlock"
	if rc := c.publish(t, foreign, 2, "forged-set"); rc != 0x87 {
		t.Errorf("publish setting alias 2 on a foreign topic: reason 0x%02x, want 0x87", rc)
	}
	if rc := c.publish(t, "", 2, "forged-only"); rc != 0x87 {
		t.Errorf("alias-only publish on a foreign topic: reason 0x%02x, want 0x87", rc)
	}
	// Bypass attempt: alias 3 set on a permitted topic, then re-set on a
	// forbidden one (refused), then alias-only: checked on what it now
	// names, never delivered on the foreign topic.
	if rc := c.publish(t, "devices/alias-1/telemetry/b", 3, "set-3"); rc != 0 {
		t.Fatalf("publish setting alias 3: reason 0x%02x", rc)
	}
	if rc := c.publish(t, foreign, 3, "forged-reset"); rc != 0x87 {
		t.Errorf("re-setting alias 3 on a foreign topic: reason 0x%02x, want 0x87", rc)
	}
	_ = c.publish(t, "", 3, "forged-bypass")
	// A marker after all of them on the same connection.
	if rc := c.publish(t, "", 1, "marker"); rc != 0 {
		t.Fatalf("marker: reason 0x%02x", rc)
	}
	w.waitFor(t, own+" marker")
	for _, p := range []string{"forged-set", "forged-only", "forged-reset", "forged-bypass"} {
		for _, m := range w.withPayload(p) {
			if strings.HasPrefix(m, "devices/victim/") || !strings.HasPrefix(m, "devices/alias-1/") {
				t.Errorf("forbidden alias publish delivered: %s", m)
			}
		}
	}
}

// rawAliasPublish is a QoS 0 PUBLISH with a Topic Alias property, built by
// hand (clients refuse to send invalid aliases).
func rawAliasPublish(topic string, alias uint16, payload string) []byte {
	body := []byte{byte(len(topic) >> 8), byte(len(topic))}
	body = append(body, topic...)
	body = append(body, 3, 0x23, byte(alias>>8), byte(alias))
	body = append(body, payload...)
	return append([]byte{0x30, byte(len(body))}, body...)
}

func TestInvalidTopicAliasIsDisconnectedWith0x94(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	dev := certOf(t, g.EnrollDevice(t, "alias-bad", "lab"))
	for _, tc := range []struct {
		name  string
		topic string
		alias uint16
	}{
		{"zero", "devices/alias-bad/telemetry/a", 0},
		{"above maximum", "devices/alias-bad/telemetry/a", 17},
		{"far above maximum", "devices/alias-bad/telemetry/a", 65535},
		{"never set, empty topic", "", 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := dialMQTT5(t, g, "alias-bad", dev)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := m.c.Write(rawAliasPublish(tc.topic, tc.alias, "x")); err != nil {
				t.Fatal(err)
			}
			code, err := m.waitDisconnect(10 * time.Second)
			if err != nil || code != 0x94 {
				t.Fatalf("DISCONNECT reason %d (%v), want 0x94 (topic alias invalid)", code, err)
			}
		})
	}
}

// writePEMs writes cert's chain and key for command-line clients.
func writePEMs(t *testing.T, cert tls.Certificate) (certFile, keyFile string) {
	t.Helper()
	dir := t.TempDir()
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

func TestTopicAliasWithMosquittoPub(t *testing.T) {
	if _, err := exec.LookPath("mosquitto_pub"); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatal("mosquitto_pub not installed")
		}
		t.Skip("mosquitto_pub not installed")
	}
	g := testenv.Start(t, testenv.Options{})
	w := watch(t, g)
	certFile, keyFile := writePEMs(t, certOf(t, g.EnrollDevice(t, "mosq-alias", "lab")))
	pub := func(topic string, lines ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1", "-p", portOf(g.Addrs.MQTT),
			"--cafile", filepath.Join(g.DataDir, ca.RootCertFile), "--cert", certFile, "--key", keyFile, "--insecure",
			"-i", "mosq-alias", "-q", "1", "-t", topic, "-D", "publish", "topic-alias", "1", "-l")
		cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// The first line goes with topic and alias, the next ones alias-only.
	const own = "devices/mosq-alias/telemetry/t"
	if out, err := pub(own, "m1", "m2", "m3"); err != nil {
		t.Fatalf("mosquitto_pub: %v\n%s", err, out)
	}
	for _, p := range []string{"m1", "m2", "m3"} {
		w.waitFor(t, own+" "+p)
	}
	// On a foreign topic nothing is delivered, alias or not.
	out, _ := pub("devices/victim/commands/unlock", "f1", "f2")
	if _, err := pub(own, "marker"); err != nil {
		t.Fatal(err)
	}
	w.waitFor(t, own+" marker")
	for _, p := range []string{"f1", "f2"} {
		if got := w.withPayload(p); len(got) != 0 {
			t.Errorf("foreign alias publish delivered: %v (mosquitto_pub: %s)", got, out)
		}
	}
}

func portOf(addr string) string {
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		panic(errors.New("no port in " + addr))
	}
	return addr[i+1:]
}
