package broker_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// connectResumable does TLS + MQTT CONNECT/CONNACK with a session cache and
// reports whether the TLS session was resumed.
func connectResumable(t *testing.T, g *testenv.Gateway, id string, cert tls.Certificate, cache tls.ClientSessionCache) (resumed bool, err error) {
	t.Helper()
	c, err := tls.Dial("tcp", g.Addrs.MQTT, &tls.Config{RootCAs: g.Roots(), ServerName: "localhost",
		Certificates: []tls.Certificate{cert}, ClientSessionCache: cache, MinVersion: tls.VersionTLS13})
	if err != nil {
		return false, err
	}
	defer c.Close()
	m := &mqtt5Conn{c: c}
	m.r = newReader(c)
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 5,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: id}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		return false, err
	}
	ack, err := m.read(5 * time.Second) // also receives the session ticket
	if err != nil {
		return false, err
	}
	if ack.ReasonCode != 0 {
		return false, errRefused
	}
	return c.ConnectionState().DidResume, nil
}

type refusedErr struct{}

func (refusedErr) Error() string { return "CONNACK refused" }

var errRefused = refusedErr{}

func TestResumedTLSSessionOfARevokedSuspendedOrExpiredDeviceIsRefused(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 4 * time.Second})
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		id     string
		cutOff func(t *testing.T)
	}{
		{"revoked", "res-rev", func(t *testing.T) {
			if _, err := g.Admin.DeviceAction(ctx, "res-rev", "revoke", "test"); err != nil {
				t.Fatal(err)
			}
		}},
		{"suspended", "res-sus", func(t *testing.T) {
			if _, err := g.Admin.DeviceAction(ctx, "res-sus", "suspend", "test"); err != nil {
				t.Fatal(err)
			}
		}},
		{"expired", "res-exp", nil},
	} {
		t.Run("a resumed TLS session of a device now "+tc.name+" is refused", func(t *testing.T) {
			d := g.EnrollDevice(t, tc.id, "lab")
			cert := certOf(t, d)
			cache := tls.NewLRUClientSessionCache(4)
			if _, err := connectResumable(t, g, tc.id, cert, cache); err != nil {
				t.Fatal(err)
			}
			resumed, err := connectResumable(t, g, tc.id, cert, cache)
			if err != nil || !resumed {
				t.Fatalf("second connection did not resume (resumed=%v, err=%v): the test would prove nothing", resumed, err)
			}
			if tc.cutOff != nil {
				tc.cutOff(t)
			} else {
				testenv.Eventually(t, 15*time.Second, func() error {
					if time.Now().Before(cert.Leaf.NotAfter) {
						return errRefused
					}
					return nil
				})
			}
			if _, err := connectResumable(t, g, tc.id, cert, cache); err == nil {
				t.Fatal("resumed session admitted")
			}
		})
	}
}
