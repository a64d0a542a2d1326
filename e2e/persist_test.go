package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// A device with a persistent session is offline; the backend queues QoS 1
// commands for it; the broker is killed with SIGKILL and restarted; the
// device reconnects and receives every command.
func TestQueuedQoS1SurvivesSIGKILL(t *testing.T) {
	e := initData(t)
	e.srv = serve(t, e.dataDir)
	ctx := context.Background()
	d, _ := e.enroll("sleepy-1", "lab")
	var mu sync.Mutex
	got := map[string]bool{}
	opts := devicesdk.ConnectOptions{BrokerAddr: e.srv.Addrs.MQTT, ServerName: "localhost", CleanSession: false}
	c, err := d.Connect(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SubscribeCommands(ctx, 1, func(devicesdk.Message) {}); err != nil {
		t.Fatal(err)
	}
	// The handler outlives the connection: it receives what the broker
	// kept for the session after the reconnect.
	d.Handle(devicesdk.CommandsFilter("sleepy-1"), func(m devicesdk.Message) {
		mu.Lock()
		got[string(m.Payload)] = true
		mu.Unlock()
	})
	c.Close() // offline, session kept

	svcDir := t.TempDir()
	e.admin("services", "issue", "--name", "backend", "--out", svcDir)
	svcCert := loadPair(t, svcDir)
	svc := connectPaho(t, e.srv.Addrs.MQTT, "backend", svcCert, e.roots)
	const n = 5
	for i := range n {
		tok := svc.Publish("devices/sleepy-1/commands/cfg", 1, false, fmt.Sprintf("cmd-%d", i))
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("publish %d: %v", i, tok.Error())
		}
	}
	svc.Disconnect(50)

	kill(t, e.srv)
	e.srv = serve(t, e.dataDir, "--mqtt-addr", e.srv.Addrs.MQTT)
	opts.BrokerAddr = e.srv.Addrs.MQTT
	c2, err := d.Connect(ctx, opts)
	if err != nil {
		t.Fatalf("reconnect after SIGKILL: %v", err)
	}
	defer c2.Close()
	testenv.Eventually(t, 15*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) < n {
			return fmt.Errorf("%d of %d queued commands received: %v", len(got), n, got)
		}
		return nil
	})
}

// After a restart, a backend service's persistent session is restored from
// storage before the service reconnects. Messages published meanwhile (and
// acknowledged) must wait for it, not be refused for want of a live
// identity.
func TestServiceSessionRestoredAfterRestartGetsMessagesPublishedBeforeItReconnects(t *testing.T) {
	e := initData(t)
	e.srv = serve(t, e.dataDir)
	ctx := context.Background()
	svcDir := t.TempDir()
	e.admin("services", "issue", "--name", "archiver", "--out", svcDir)
	svcCert := loadPair(t, svcDir)
	var mu sync.Mutex
	got := map[string]bool{}
	connect := func(addr string) paho.Client {
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + addr).SetClientID("archiver").
			SetTLSConfig(&tls.Config{RootCAs: e.roots, ServerName: "localhost", Certificates: []tls.Certificate{svcCert}}).
			SetCleanSession(false).SetAutoReconnect(false).
			SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
				mu.Lock()
				got[string(m.Payload())] = true
				mu.Unlock()
			}))
		if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("archiver connect: %v", tok.Error())
		}
		return c
	}
	svc := connect(e.srv.Addrs.MQTT)
	if tok := svc.Subscribe("devices/+/telemetry/#", 1, nil); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	svc.Disconnect(50)

	stop(t, e.srv)
	e.srv = serve(t, e.dataDir, "--mqtt-addr", e.srv.Addrs.MQTT)
	d, _ := e.enroll("early-1", "lab")
	c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: e.srv.Addrs.MQTT, ServerName: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := range 3 {
		if err := c.PublishTelemetry(ctx, "t", 1, []byte(fmt.Sprintf("m-%d", i))); err != nil {
			t.Fatal(err)
		}
	}
	svc2 := connect(e.srv.Addrs.MQTT)
	defer svc2.Disconnect(50)
	testenv.Eventually(t, 10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) < 3 {
			return fmt.Errorf("archiver got %v, want m-0..m-2", got)
		}
		return nil
	})
}
