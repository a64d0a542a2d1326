package broker_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func (m *mqtt5Conn) publish(t *testing.T, topic string, payload []byte) error {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: payload, ProtocolVersion: 5}
	var buf bytes.Buffer
	if err := pk.PublishEncode(&buf); err != nil {
		t.Fatal(err)
	}
	_, err := m.c.Write(buf.Bytes())
	return err
}

func TestDeviceOverItsRateLimitIsDisconnectedWithReason(t *testing.T) {
	g := testenv.Start(t, testenv.Options{Limits: broker.Limits{MsgRate: 5, MsgBurst: 10}})
	dev := g.EnrollDevice(t, "chatty", "lab")
	m, err := dialMQTT5(t, g, "chatty", certOf(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if m.publish(t, "devices/chatty/telemetry/t", []byte("x")) != nil {
			break // the broker closed the connection
		}
	}
	m.wantLimitDisconnect(t, g, 5*time.Second, "message_rate")
	// A well-behaved device is unaffected.
	calm := g.EnrollDevice(t, "calm", "lab")
	c, err := calm.Connect(context.Background(), brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i := 0; i < 5; i++ {
		if err := c.PublishTelemetry(context.Background(), "t", 1, []byte("ok")); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSubscriptionLimit(t *testing.T) {
	g := testenv.Start(t, testenv.Options{Limits: broker.Limits{MaxSubscriptions: 2}})
	ctx := context.Background()
	dev := g.EnrollDevice(t, "subber", "lab")
	c, err := dev.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, f := range []string{"devices/subber/commands/a", "devices/subber/commands/b"} {
		if err := c.Subscribe(ctx, f, 1, func(devicesdk.Message) {}); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
	}
	if err := c.Subscribe(ctx, "devices/subber/commands/c", 1, func(devicesdk.Message) {}); !errors.Is(err, devicesdk.ErrSubscriptionRefused) {
		t.Fatalf("third subscription: %v, want refused", err)
	}
	// Re-subscribing to an existing filter does not count again.
	if err := c.Subscribe(ctx, "devices/subber/commands/a", 1, func(devicesdk.Message) {}); err != nil {
		t.Fatalf("re-subscribe: %v", err)
	}
}

// A flood of connections that never finish the TLS handshake, from a few
// source addresses, does not keep real devices out.
func TestHalfOpenFloodDoesNotStarveDevices(t *testing.T) {
	g := testenv.Start(t, testenv.Options{HandshakeTimeout: time.Minute, MaxPending: 1024, MaxPendingPerIP: 64})
	var flood []net.Conn
	t.Cleanup(func() {
		for _, c := range flood {
			c.Close()
		}
	})
	refused := 0
	for i := 0; i < 2000; i++ {
		src := net.IPv4(127, 0, 0, byte(2+i%4)) // 127.0.0.2-5: loopback
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", g.Addrs.MQTT)
		if err != nil {
			refused++
			continue
		}
		flood = append(flood, c) // never writes a byte
	}
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		id := fmt.Sprintf("real-%d", i)
		d := g.EnrollDevice(t, id, "lab")
		c, err := d.Connect(ctx, brokerOpts(g))
		if err != nil {
			t.Fatalf("%s could not connect during the flood: %v", id, err)
		}
		if err := c.PublishTelemetry(ctx, "t", 1, []byte("through")); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		// Stalled connections were evicted to make room: for the global
		// cap, or for the per-address cap once they outlived its grace.
		m := g.Metrics(t)
		if !strings.Contains(m, `fleetgate_broker_limit_hits_total{limit="pending_per_ip"}`) &&
			!strings.Contains(m, `fleetgate_broker_limit_hits_total{limit="pending_evicted"}`) {
			return errors.New("no eviction counted")
		}
		return nil
	})
	t.Logf("flood: %d connections opened, %d refused at dial", len(flood), refused)
}
