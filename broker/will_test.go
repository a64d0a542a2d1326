package broker_test

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"
	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
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

// connectWill5 connects an MQTT 5 client (paho.golang) with a Last Will on
// its own state topic, will delay and session expiry; drop closes its
// network connection without DISCONNECT (the will is due).
func connectWill5(t *testing.T, g *testenv.Gateway, id string, cert tls.Certificate, delay, expiry uint32, clean bool) (drop func()) {
	t.Helper()
	conn, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	c := paho5.NewClient(paho5.ClientConfig{Conn: conn, OnClientError: func(error) {}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho5.Connect{ClientID: id, KeepAlive: 30, CleanStart: clean,
		Properties:     &paho5.ConnectProperties{SessionExpiryInterval: &expiry},
		WillMessage:    &paho5.WillMessage{Topic: "devices/" + id + "/state", Payload: []byte("will of " + id), QoS: 1},
		WillProperties: &paho5.WillProperties{WillDelayInterval: &delay},
	}); err != nil {
		t.Fatalf("%s connect: %v", id, err)
	}
	return func() { conn.Close() }
}

// TestWillDelayIsHonouredAndStillHeldToThePolicy: will delay 2 s. A device
// that reconnects within the delay sends no will; one that stays away does;
// one revoked during the delay never does; one whose will topic the policy
// denies by the time the delay ends does not either; with a session expiry
// shorter than the delay, the will goes at session expiry.
func TestWillDelayIsHonouredAndStillHeldToThePolicy(t *testing.T) {
	dir := testenv.Init(t)
	g := testenv.Start(t, testenv.Options{DataDir: dir})
	ctx := context.Background()
	w := watch(t, g)
	certs := map[string]tls.Certificate{}
	for _, id := range []string{"will-back", "will-rev", "will-pol", "will-away", "will-exp"} {
		certs[id] = certOf(t, g.EnrollDevice(t, id, "lab"))
	}
	drops := map[string]func(){}
	for _, id := range []string{"will-back", "will-rev", "will-pol", "will-away"} {
		drops[id] = connectWill5(t, g, id, certs[id], 2, 60, true)
	}
	// Dropped in this order: will-away last, so its will is due last.
	for _, id := range []string{"will-back", "will-rev", "will-pol", "will-away"} {
		drops[id]()
	}
	// will-back reconnects within the delay (its session resumes).
	connectWill5(t, g, "will-back", certs["will-back"], 2, 60, false)
	// will-rev is revoked during the delay.
	if _, err := g.Admin.DeviceAction(ctx, "will-rev", "revoke", "test"); err != nil {
		t.Fatal(err)
	}
	// The policy now denies will-pol's will topic.
	if err := os.WriteFile(filepath.Join(dir, server.PolicyFileName), []byte(acl.DefaultFile+`  - name: no-will-pol
    roles: [device]
    deny: [publish]
    topics: ["devices/will-pol/state"]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.ReloadPolicy(ctx); err != nil {
		t.Fatal(err)
	}

	// will-away's will arrives after its delay; the others were due no
	// later, so by now they have been sent or dropped.
	testenv.Eventually(t, 30*time.Second, func() error {
		if len(w.withPayload("will of will-away")) == 0 {
			return errors.New("will-away's will not delivered")
		}
		return nil
	})
	for _, id := range []string{"will-back", "will-rev", "will-pol"} {
		if got := w.withPayload("will of " + id); len(got) != 0 {
			t.Errorf("%s: will delivered: %v", id, got)
		}
	}
	if got := w.withPayload("will of will-away"); len(got) != 1 || got[0] != "devices/will-away/state will of will-away" {
		t.Errorf("will-away: %v", got)
	}

	// Session expiry (1 s) before the will delay (1 h): the will goes when
	// the session ends.
	connectWill5(t, g, "will-exp", certs["will-exp"], 3600, 1, true)()
	testenv.Eventually(t, 30*time.Second, func() error {
		if len(w.withPayload("will of will-exp")) == 0 {
			return errors.New("will-exp's will not delivered at session expiry")
		}
		return nil
	})
}
