package broker_test

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// subscribeN sends one SUBSCRIBE of n filters under prefix.
func (m *mqtt5Conn) subscribeN(t *testing.T, id uint16, prefix string, n int) {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id, ProtocolVersion: 5}
	for i := 0; i < n; i++ {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: fmt.Sprintf("%s/%d", prefix, i), Qos: 1})
	}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := m.c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
}

// expect reads the next packet and fails unless it has type typ (and, for
// a DISCONNECT, reason code).
func (m *mqtt5Conn) expect(t *testing.T, typ byte, code byte, what string) {
	t.Helper()
	pk, err := m.read(10 * time.Second)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if pk.FixedHeader.Type != typ || (typ == packets.Disconnect && pk.ReasonCode != code) {
		t.Fatalf("%s: got packet type %d reason 0x%02x, want type %d", what, pk.FixedHeader.Type, pk.ReasonCode, typ)
	}
}

// A device's SUBSCRIBE and PUBLISH rates are kept across its reconnects:
// a device that spent its burst and reconnects continues with what is left
// of it, not with a fresh one. A device reconnecting a few times within its
// rates is unaffected.
func TestRateLimitsSurviveReconnect(t *testing.T) {
	const burst = 10
	// Rates so low that no token comes back during the test.
	g := testenv.Start(t, testenv.Options{Limits: broker.Limits{SubRate: 0.001, SubBurst: burst, MsgRate: 0.001, MsgBurst: burst}})
	sub := certOf(t, g.EnrollDevice(t, "resub", "lab"))
	m, err := dialMQTT5(t, g, "resub", sub)
	if err != nil {
		t.Fatal(err)
	}
	m.subscribeN(t, 1, "devices/resub/commands", burst)
	m.expect(t, packets.Suback, 0, "SUBSCRIBE of the whole burst")
	m.c.Close()
	m, err = dialMQTT5(t, g, "resub", sub)
	if err != nil {
		t.Fatal(err)
	}
	m.subscribeN(t, 2, "devices/resub/commands/more", 1)
	m.expect(t, packets.Disconnect, 0x96, "SUBSCRIBE after reconnecting with the burst spent")

	pub := certOf(t, g.EnrollDevice(t, "repub", "lab"))
	m, err = dialMQTT5(t, g, "repub", pub)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < burst; i++ {
		if err := m.publish(t, "devices/repub/telemetry/t", []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	// A SUBSCRIBE answered: the publishes before it were read and allowed.
	m.subscribeN(t, 1, "devices/repub/commands", 1)
	m.expect(t, packets.Suback, 0, "SUBSCRIBE after the publish burst")
	m.c.Close()
	m, err = dialMQTT5(t, g, "repub", pub)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.publish(t, "devices/repub/telemetry/t", []byte("x")); err != nil {
		t.Fatal(err)
	}
	m.expect(t, packets.Disconnect, 0x96, "PUBLISH after reconnecting with the burst spent")

	// A device well within its rates reconnects a few times, subscribing
	// and publishing on each connection.
	calm := certOf(t, g.EnrollDevice(t, "recalm", "lab"))
	for i := 0; i < 3; i++ {
		m, err := dialMQTT5(t, g, "recalm", calm)
		if err != nil {
			t.Fatalf("connect %d: %v", i, err)
		}
		if err := m.publish(t, "devices/recalm/telemetry/t", []byte("x")); err != nil {
			t.Fatal(err)
		}
		m.subscribeN(t, uint16(i+1), fmt.Sprintf("devices/recalm/commands/%d", i), 2)
		m.expect(t, packets.Suback, 0, fmt.Sprintf("SUBSCRIBE on connection %d", i))
		m.c.Close()
	}
}
