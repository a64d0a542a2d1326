package broker_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

func connectWithWill(g *testenv.Gateway, id string, cert tls.Certificate, topic string, retain bool) (paho.Client, error) {
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://"+g.Addrs.MQTT).SetClientID(id).
		SetTLSConfig(&tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}}).
		SetAutoReconnect(false).SetWill(topic, "will of "+id, 1, retain))
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, errRefused
	}
	return c, tok.Error()
}

func TestLastWillIsHeldToThePolicy(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	g.EnrollDevice(t, "victim", "lab")
	attacker := certOf(t, g.EnrollDevice(t, "attacker", "lab"))

	// Watch what reaches the victim's commands and the event topic.
	svcCert := g.Service(t, "watch")
	svc, err := g.MQTT(t, "watch", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan string, 16)
	svc.Subscribe("devices/#", 1, func(_ paho.Client, m paho.Message) { got <- m.Topic() + " " + string(m.Payload()) }).Wait()

	for _, topic := range []string{"devices/victim/commands/unlock", "groups/lab/broadcast/x", "$fleetgate/events/device/victim/disconnected"} {
		if c, err := connectWithWill(g, "attacker", attacker, topic, true); err == nil {
			c.Disconnect(0)
			t.Fatalf("CONNECT with a will on %s was accepted", topic)
		}
	}
	if !strings.Contains(g.Metrics(t), `fleetgate_broker_auth_failures_total{reason="will_denied"}`) {
		t.Error("will refusal not counted")
	}

	// A will on its own state topic is allowed.
	if _, err := connectWithWill(g, "attacker", attacker, "devices/attacker/state", true); err != nil {
		t.Fatalf("will on own state topic refused: %v", err)
	}
	// A revoked device's will is not sent.
	if _, err := g.Admin.DeviceAction(ctx, "attacker", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	// A marker from the service side: everything before it has arrived.
	svc.Publish("devices/victim/commands/marker", 1, false, "m").Wait()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case m := <-got:
			if strings.Contains(m, "will of attacker") {
				t.Fatalf("revoked device's will delivered: %s", m)
			}
			if strings.HasPrefix(m, "devices/victim/commands/marker") {
				return
			}
		case <-deadline:
			t.Fatal("marker not received")
		}
	}
}
