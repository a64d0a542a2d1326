package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// readUntilClosed reads from c until the broker closes it (or fails the
// test after timeout).
func readUntilClosed(t *testing.T, c net.Conn, timeout time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("broker kept a garbage connection open")
	}
}

func TestGarbageOnTheMQTTPortIsClosedAndTheBrokerKeepsServing(t *testing.T) {
	g := testenv.Start(t, testenv.Options{HandshakeTimeout: 2 * time.Second})
	dev := g.EnrollDevice(t, "sane", "lab")
	cert := certOf(t, dev)
	tlsCfg := func() *tls.Config {
		return &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{cert}}
	}
	cases := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"plain text instead of TLS is refused", func(t *testing.T) {
			c, err := net.Dial("tcp", g.Addrs.MQTT)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
			readUntilClosed(t, c, 5*time.Second)
		}},
		{"a silent TCP connection is closed at the ClientHello deadline", func(t *testing.T) {
			c, err := net.Dial("tcp", g.Addrs.MQTT)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			readUntilClosed(t, c, 10*time.Second)
		}},
		{"garbage instead of CONNECT after a valid handshake is refused", func(t *testing.T) {
			c, err := tls.Dial("tcp", g.Addrs.MQTT, tlsCfg())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write(bytes.Repeat([]byte{0xff}, 64))
			readUntilClosed(t, c, 5*time.Second)
		}},
		{"a valid handshake and no CONNECT is closed at the deadline", func(t *testing.T) {
			c, err := tls.Dial("tcp", g.Addrs.MQTT, tlsCfg())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			readUntilClosed(t, c, 10*time.Second)
		}},
		{"a malformed packet after CONNECT closes the session", func(t *testing.T) {
			m, err := dialMQTT5(t, g, "sane", cert)
			if err != nil {
				t.Fatal(err)
			}
			// A PUBLISH whose remaining length promises more than its topic
			// length field allows.
			m.c.Write([]byte{0x30, 0x03, 0x00, 0xff, 'a'})
			readUntilClosed(t, m.c, 5*time.Second)
		}},
		{"an oversized packet closes the session", func(t *testing.T) {
			m, err := dialMQTT5(t, g, "sane", cert)
			if err != nil {
				t.Fatal(err)
			}
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "devices/sane/telemetry/big",
				Payload: make([]byte, 300<<10), ProtocolVersion: 5}
			var buf bytes.Buffer
			if err := pk.PublishEncode(&buf); err != nil {
				t.Fatal(err)
			}
			m.c.Write(buf.Bytes())
			readUntilClosed(t, m.c, 5*time.Second)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, tc.run)
	}
	// The broker still serves a well-behaved device.
	c, err := dev.Connect(context.Background(), brokerOpts(g))
	if err != nil {
		t.Fatalf("broker no longer serves after garbage: %v", err)
	}
	defer c.Close()
	if err := c.PublishTelemetry(context.Background(), "t", 1, []byte("ok")); err != nil {
		t.Fatal(err)
	}
	m := g.Metrics(t)
	for _, reason := range []string{"not_tls", "hello_timeout"} {
		if !strings.Contains(m, `fleetgate_broker_auth_failures_total{reason="`+reason+`"}`) {
			t.Errorf("refusal %s not counted", reason)
		}
	}
}
