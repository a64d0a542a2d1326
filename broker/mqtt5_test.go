package broker_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// mqtt5Conn is a minimal MQTT 5 client built from mochi's packet codec, for
// tests that must see reason codes (paho.mqtt.golang speaks 3.1.1 only).
type mqtt5Conn struct {
	c *tls.Conn
	r *bufio.Reader
}

func dialMQTT5(t *testing.T, g *testenv.Gateway, clientID string, cert tls.Certificate) (*mqtt5Conn, error) {
	t.Helper()
	c, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	m := &mqtt5Conn{c: c, r: bufio.NewReader(c)}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: clientID}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		return nil, err
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		return nil, err
	}
	ack, err := m.read(10 * time.Second)
	if err != nil {
		return nil, err
	}
	if ack.FixedHeader.Type != packets.Connack || ack.ReasonCode != 0 {
		return nil, fmt.Errorf("CONNACK type %d reason 0x%02x", ack.FixedHeader.Type, ack.ReasonCode)
	}
	return m, nil
}

// read reads one packet (CONNACK and DISCONNECT are decoded).
func (m *mqtt5Conn) read(timeout time.Duration) (packets.Packet, error) {
	_ = m.c.SetReadDeadline(time.Now().Add(timeout))
	var pk packets.Packet
	hb, err := m.r.ReadByte()
	if err != nil {
		return pk, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return pk, err
	}
	n, _, err := packets.DecodeLength(m.r)
	if err != nil {
		return pk, err
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(m.r, body); err != nil {
		return pk, err
	}
	pk.ProtocolVersion = 5
	pk.FixedHeader.Remaining = n
	switch pk.FixedHeader.Type {
	case packets.Connack:
		err = pk.ConnackDecode(body)
	case packets.Disconnect:
		err = pk.DisconnectDecode(body)
	}
	return pk, err
}

// wantLimitDisconnect asserts that the broker ends m with DISCONNECT 0x96
// (message rate too high) and counts the hit in limit_hits_total{limit}.
func (m *mqtt5Conn) wantLimitDisconnect(t *testing.T, g *testenv.Gateway, timeout time.Duration, limit string) {
	t.Helper()
	code, err := m.waitDisconnect(timeout)
	if err != nil {
		t.Fatal(err)
	}
	if code != 0x96 {
		t.Fatalf("DISCONNECT reason 0x%02x, want 0x96 message rate too high", code)
	}
	testenv.Eventually(t, 5*time.Second, func() error {
		if limitHits(t, g, limit) == 0 {
			return fmt.Errorf("limit %s hit not counted", limit)
		}
		return nil
	})
}

// waitDisconnect reads until a DISCONNECT (returning its reason code) or
// the connection closes (returning -1).
func (m *mqtt5Conn) waitDisconnect(timeout time.Duration) (int, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		pk, err := m.read(time.Until(deadline))
		if err != nil {
			if err == io.EOF {
				return -1, nil
			}
			return -1, err
		}
		if pk.FixedHeader.Type == packets.Disconnect {
			return int(pk.ReasonCode), nil
		}
	}
	return -1, fmt.Errorf("no DISCONNECT within %s", timeout)
}

func newReader(c *tls.Conn) *bufio.Reader { return bufio.NewReader(c) }
