package broker_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

const allowAllPolicy = `rules:
  - name: everything
    allow: [publish, subscribe, retain]
    topics: ["#"]
`

// BenchmarkFanInQoS0 measures delivered messages per second, 20 devices
// publishing 64-byte QoS 0 telemetry to one service subscribed to
// devices/+/telemetry/#, with fleetgate's default policy and with a policy
// that allows everything, side by side:
//
//	go test -run '^$' -bench FanInQoS0 -benchtime 20000x ./broker/
func BenchmarkFanInQoS0(b *testing.B) {
	for _, pc := range []struct{ name, policy string }{{"default-policy", ""}, {"allow-all", allowAllPolicy}} {
		b.Run(pc.name, func(b *testing.B) {
			dir := testenv.Init(b)
			if pc.policy != "" {
				if err := os.WriteFile(filepath.Join(dir, server.PolicyFileName), []byte(pc.policy), 0o644); err != nil {
					b.Fatal(err)
				}
			}
			g := testenv.Start(b, testenv.Options{DataDir: dir, Limits: broker.Limits{MsgRate: 1e9, MsgBurst: 1e9, ByteRate: 1e12, ByteBurst: 1e12}})
			svcCert := g.Service(b, "sink")
			svc, err := g.MQTT(b, "sink", &svcCert)
			if err != nil {
				b.Fatal(err)
			}
			var got atomic.Int64
			svc.Subscribe("devices/+/telemetry/#", 0, func(paho.Client, paho.Message) { got.Add(1) }).Wait()
			const devices = 20
			clients := make([]*devicesdk.Client, devices)
			for i := range clients {
				d := g.EnrollDevice(b, fmt.Sprintf("fan-%02d", i), "bench")
				c, err := d.Connect(context.Background(), brokerOpts(g))
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				clients[i] = c
			}
			payload := make([]byte, 64)
			per := max(1, b.N/devices)
			b.ResetTimer()
			t0 := time.Now()
			var wg sync.WaitGroup
			for _, c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for range per {
						_ = c.PublishTelemetry(context.Background(), "t", 0, payload)
					}
				}()
			}
			wg.Wait()
			want := int64(per * devices)
			deadline := time.Now().Add(30 * time.Second)
			for got.Load() < want && time.Now().Before(deadline) {
				last := got.Load()
				time.Sleep(100 * time.Millisecond)
				if got.Load() == last && time.Since(t0) > time.Second {
					break // nothing more is coming: the rest was dropped
				}
			}
			el := time.Since(t0)
			b.StopTimer()
			b.ReportMetric(float64(got.Load())/el.Seconds(), "delivered/s")
			b.ReportMetric(100*float64(want-got.Load())/float64(want), "%lost")
		})
	}
}
