package broker_test

import (
	"crypto/tls"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// BenchmarkFieldConnect: a device's TLS handshake, CONNECT and CONNACK,
// then DISCONNECT (paho, MQTT 3.1.1), over TLS 1.3 and TLS 1.2, plain and wss, on one
// broker started with --min-tls 1.2 and --wss-listen.
//
//	go test -run '^$' -bench FieldConnect -benchtime 100x ./broker/
func BenchmarkFieldConnect(b *testing.B) {
	cfg := testenv.Config(b, testenv.Options{})
	cfg.MinTLS, cfg.WSSListen = "1.2", "127.0.0.1:0"
	g := testenv.StartConfig(b, cfg)
	d := g.EnrollDevice(b, "bench-field", "lab")
	tc, err := d.TLSConfig("localhost")
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name, url string
		max       uint16
	}{
		{"tls1.3", "tls://" + g.Addrs.MQTT, tls.VersionTLS13},
		{"tls1.2", "tls://" + g.Addrs.MQTT, tls.VersionTLS12},
		{"wss-tls1.3", "wss://" + g.Addrs.WSS + "/mqtt", tls.VersionTLS13},
		{"wss-tls1.2", "wss://" + g.Addrs.WSS + "/mqtt", tls.VersionTLS12},
	} {
		b.Run(c.name, func(b *testing.B) {
			t := tc.Clone()
			t.MinVersion, t.MaxVersion = tls.VersionTLS12, c.max
			o := paho.NewClientOptions().AddBroker(c.url).SetClientID("bench-field").SetTLSConfig(t).
				SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(10 * time.Second)
			for b.Loop() {
				cl := paho.NewClient(o)
				if tok := cl.Connect(); !tok.WaitTimeout(15*time.Second) || tok.Error() != nil {
					b.Fatalf("connect: %v", tok.Error())
				}
				cl.Disconnect(0)
			}
		})
	}
}
