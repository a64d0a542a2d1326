package broker_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

func deviceCert(t *testing.T, g *testenv.Gateway, id string) tls.Certificate {
	t.Helper()
	d := g.EnrollDevice(t, id, "lab")
	cfg, err := d.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	c, err := cfg.GetClientCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

// issueWith signs a device certificate with the real issuing CA at a given
// clock, without recording it in the registry.
func issueWith(t *testing.T, g *testenv.Gateway, id string, now time.Time, ttl time.Duration, server bool) tls.Certificate {
	t.Helper()
	a, err := ca.Load(g.DataDir, ca.Options{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	k := testpki.NewKey(t)
	var c *x509.Certificate
	if server {
		c, err = a.IssueServer([]string{id}, k.Public(), ttl)
	} else {
		c, err = a.Issue(identity.Identity{Role: identity.RoleDevice, Name: id}, k.Public(), ttl)
	}
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{c.Raw, a.Issuing().Raw}, PrivateKey: k, Leaf: c}
}

func TestMTLSSeedTable(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	valid := deviceCert(t, g, "sensor-1")
	g.EnrollDevice(t, "sensor-2", "lab")
	uri := "spiffe://test.fleetgate/device/sensor-1"
	unknownCA := testpki.NewCA(t, "somebody else's CA")
	now := time.Now()

	cases := []struct {
		name     string
		clientID string
		cert     *tls.Certificate
		ok       bool
		reason   string // metric label expected to count the refusal
	}{
		{"a valid enrolled certificate connects", "sensor-1", &valid, true, ""},
		{"a self-signed certificate is refused", "sensor-1", ptr(testpki.Issue(t, nil, testpki.Leaf{URI: uri, CN: "sensor-1"})), false, "unknown_ca"},
		{"no certificate is refused", "sensor-1", nil, false, "no_cert"},
		{"a certificate from an unknown CA is refused", "sensor-1", ptr(testpki.Issue(t, unknownCA, testpki.Leaf{URI: uri, CN: "sensor-1"})), false, "unknown_ca"},
		{"an expired certificate from the issuing CA is refused", "sensor-1", ptr(issueWith(t, g, "sensor-1", now.Add(-48*time.Hour), time.Hour, false)), false, "expired"},
		{"a not-yet-valid certificate is refused", "sensor-1", ptr(issueWith(t, g, "sensor-1", now.Add(48*time.Hour), time.Hour, false)), false, "expired"},
		{"a certificate with only serverAuth EKU is refused", "sensor-1", ptr(issueWith(t, g, "sensor-1", now, time.Hour, true)), false, "wrong_key_usage"},
		{"a certificate the registry never issued is refused though it chains to the issuing CA", "sensor-1", ptr(issueWith(t, g, "sensor-1", now, time.Hour, false)), false, "unknown_serial"},
		{"a valid certificate with another device's client ID is refused", "sensor-2", &valid, false, "client_id_mismatch"},
		{"a valid certificate with an empty client ID is refused", "", &valid, false, "client_id_mismatch"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := g.MQTT(t, tc.clientID, tc.cert)
			if tc.ok {
				if err != nil {
					t.Fatalf("want connected, got %v", err)
				}
				if !c.IsConnectionOpen() {
					t.Fatal("connection not open")
				}
				return
			}
			if err == nil {
				t.Fatal("connected, want refused")
			}
			testenv.Eventually(t, 5*time.Second, func() error {
				m := g.Metrics(t)
				if !strings.Contains(m, `fleetgate_broker_auth_failures_total{reason="`+tc.reason+`"}`) {
					return fmt.Errorf("metric for reason %s not found", tc.reason)
				}
				return nil
			})
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestTopicsEndToEnd(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	a := g.EnrollDevice(t, "dev-a", "lab")
	b := g.EnrollDevice(t, "dev-b", "lab")
	svcCert := g.Service(t, "backend")

	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[string][]string{}
	tok := svc.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		got[m.Topic()] = append(got[m.Topic()], string(m.Payload()))
		mu.Unlock()
	})
	tok.Wait()
	if tok.Error() != nil || tok.(*paho.SubscribeToken).Result()["devices/+/telemetry/#"] >= 0x80 {
		t.Fatalf("service subscribe refused: %v %v", tok.Error(), tok.(*paho.SubscribeToken).Result())
	}

	ca, err := a.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close()
	cb, err := b.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close()

	// dev-b receives commands on its own topic from the service.
	cmds := make(chan string, 4)
	if err := cb.SubscribeCommands(ctx, 1, func(m devicesdkMessage) { cmds <- m.Topic }); err != nil {
		t.Fatal(err)
	}
	// A device may not subscribe to the whole fleet, nor to another's commands.
	for _, f := range []string{"devices/#", "devices/+/commands/#", "devices/dev-a/commands/#", "#", "$SYS/#"} {
		if err := cb.Subscribe(ctx, f, 1, func(devicesdkMessage) {}); err == nil {
			t.Errorf("device subscribed to %q, want refused", f)
		}
	}

	// dev-a publishes to its own topic at QoS 1: delivered.
	if err := ca.PublishTelemetry(ctx, "temp", 1, []byte("21.5")); err != nil {
		t.Fatal(err)
	}
	// dev-a publishes to dev-b's telemetry at QoS 0 (dropped silently) and
	// to dev-b's commands: neither is delivered.
	_ = ca.Publish(ctx, "devices/dev-b/telemetry/temp", 0, false, []byte("forged"))
	_ = ca.Publish(ctx, "devices/dev-b/commands/reboot", 0, false, []byte("forged"))
	// A marker after the forged messages: when it arrives, anything forged
	// published before it on the same connection would have arrived too.
	if err := ca.PublishTelemetry(ctx, "marker", 1, []byte("end")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got["devices/dev-a/telemetry/marker"]) == 0 {
			return fmt.Errorf("marker not received yet: %v", got)
		}
		return nil
	})
	mu.Lock()
	if v := got["devices/dev-a/telemetry/temp"]; len(v) != 1 || v[0] != "21.5" {
		t.Errorf("service got %v for dev-a telemetry, want [21.5]", v)
	}
	if v, ok := got["devices/dev-b/telemetry/temp"]; ok {
		t.Errorf("forged telemetry delivered: %v", v)
	}
	mu.Unlock()

	// The service commands dev-b; dev-b receives it and nothing forged.
	pt := svc.Publish("devices/dev-b/commands/led", 1, false, "on")
	pt.Wait()
	if pt.Error() != nil {
		t.Fatal(pt.Error())
	}
	select {
	case topic := <-cmds:
		if topic != "devices/dev-b/commands/led" {
			t.Fatalf("dev-b got command on %s, want devices/dev-b/commands/led (forged command delivered?)", topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("command not delivered")
	}
	if !strings.Contains(g.Metrics(t), `fleetgate_broker_acl_denied_total{direction="publish"}`) {
		t.Error("ACL denial of publish not counted")
	}
}
