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
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// subscribe sends a SUBSCRIBE (or UNSUBSCRIBE) of one filter with packet ID id.
func (m *mqtt5Conn) subscribe(t *testing.T, id uint16, filter string, unsubscribe bool) error {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: id, ProtocolVersion: 5,
		Filters: packets.Subscriptions{{Filter: filter, Qos: 1}}}
	var buf bytes.Buffer
	var err error
	if unsubscribe {
		pk.FixedHeader.Type = packets.Unsubscribe
		err = pk.UnsubscribeEncode(&buf)
	} else {
		err = pk.SubscribeEncode(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.c.Write(buf.Bytes())
	return err
}

// refusalLines counts the log lines of refused filters.
func refusalLines(logs string) int {
	return strings.Count(logs, `msg="acl denied"`) + strings.Count(logs, `msg="subscription refused: limit reached"`)
}

// A device that sends SUBSCRIBE/UNSUBSCRIBE as fast as it can is cut off
// with DISCONNECT 0x96, like a device over its publish rate.
func TestSubscribeFloodIsCutOff(t *testing.T) {
	const flood = 5000
	g := testenv.Start(t, testenv.Options{})
	dev := g.EnrollDevice(t, "subflood", "lab")
	cert := certOf(t, dev)
	m, err := dialMQTT5(t, g, "subflood", cert)
	if err != nil {
		t.Fatal(err)
	}
	sent := 0
	for i := 0; i < flood; i++ {
		f := fmt.Sprintf("devices/subflood/commands/%d", i%8)
		if m.subscribe(t, uint16(i%60000+1), f, i%2 == 1) != nil {
			break // the broker closed the connection
		}
		sent++
	}
	// The broker answers some, then closes the connection. (Its DISCONNECT
	// may be lost: closing a socket with unread input resets it.)
	acks := 0
	for {
		pk, err := m.read(10 * time.Second)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("connection still open after %d SUBSCRIBE/UNSUBSCRIBE, %d answered", sent, acks)
			}
			break
		}
		switch pk.FixedHeader.Type {
		case packets.Suback, packets.Unsuback:
			acks++
		case packets.Disconnect:
			if pk.ReasonCode != 0x96 {
				t.Fatalf("DISCONNECT reason 0x%02x, want 0x96 message rate too high", pk.ReasonCode)
			}
		}
	}
	t.Logf("flood of %d SUBSCRIBE/UNSUBSCRIBE written: %d answered before the broker disconnected", sent, acks)
	if acks >= flood {
		t.Fatalf("all %d answered: not cut off", acks)
	}
	// The reason, where nothing else is in flight: one SUBSCRIBE with more
	// filters than the burst.
	m2, err := dialMQTT5(t, g, "subflood", cert)
	if err != nil {
		t.Fatal(err)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, PacketID: 1, ProtocolVersion: 5}
	for i := 0; i <= broker.DefaultLimits.SubBurst; i++ {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: fmt.Sprintf("devices/subflood/commands/%d", i), Qos: 1})
	}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := m2.c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	m2.wantLimitDisconnect(t, g, 10*time.Second, "subscribe_rate")
	// A device that subscribes a few times is unaffected, and gets its
	// commands.
	calm := g.EnrollDevice(t, "subcalm", "lab")
	ctx := context.Background()
	c, err := calm.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make(chan string, 1)
	for i := 0; i < 5; i++ {
		if err := c.Subscribe(ctx, fmt.Sprintf("devices/subcalm/commands/%d", i), 1, func(m devicesdkMessage) {
			select {
			case got <- m.Topic:
			default:
			}
		}); err != nil {
			t.Fatalf("subscription %d of a calm device: %v", i, err)
		}
	}
	svcCert := g.Service(t, "cmd-sender")
	svc, err := g.MQTT(t, "cmd-sender", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Disconnect(0)
	if tok := svc.Publish("devices/subcalm/commands/3", 1, false, "go"); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("command publish: %v", tok.Error())
	}
	select {
	case topic := <-got:
		if topic != "devices/subcalm/commands/3" {
			t.Fatalf("got %s", topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the calm device did not get its command")
	}
	if !c.IsConnected() {
		t.Fatal("the calm device was disconnected")
	}
}

// Refused filters are logged a few times per identity, then summarised:
// the log does not grow with the number of refusals.
func TestRefusedFiltersAreLoggedBoundedly(t *testing.T) {
	const refused = 400
	// A subscribe rate high enough that the refusals, not the rate, are
	// what this test sees.
	g := testenv.Start(t, testenv.Options{Limits: broker.Limits{MaxSubscriptions: 2, SubRate: 1e6, SubBurst: 1e6}})
	dev := g.EnrollDevice(t, "refused", "lab")
	m, err := dialMQTT5(t, g, "refused", certOf(t, dev))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < refused; i++ {
		f := fmt.Sprintf("devices/other-%d/commands/#", i) // denied by the policy
		if i%2 == 1 {
			f = fmt.Sprintf("devices/refused/commands/%d", i) // beyond MaxSubscriptions
		}
		if err := m.subscribe(t, uint16(i+1), f, false); err != nil {
			t.Fatal(err)
		}
	}
	// Every SUBSCRIBE was answered: all refusals happened.
	acks := 0
	for acks < refused {
		pk, err := m.read(10 * time.Second)
		if err != nil {
			t.Fatalf("after %d SUBACKs: %v", acks, err)
		}
		if pk.FixedHeader.Type == packets.Suback {
			acks++
		}
	}
	n := refusalLines(g.Logs.String())
	t.Logf("%d refused filters: %d log lines", refused, n)
	if n > 20 {
		t.Fatalf("%d refused filters wrote %d refusal log lines; want a bounded few and a summary", refused, n)
	}
	if n == 0 {
		t.Fatal("no refusal logged at all")
	}
}
