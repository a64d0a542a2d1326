package broker_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// BenchmarkRevokeToDisconnect revokes connected devices one by one and
// measures, on the client side, the time from the revoke call returning to
// the connection being closed (negative: closed before the call returned,
// counted as 0), and from the call starting. Run it once:
//
//	go test -run '^$' -bench RevokeToDisconnect -benchtime 1x ./broker/
//
// FLEETGATE_BENCH_DEVICES sets the fleet size (default 1000).
func BenchmarkRevokeToDisconnect(b *testing.B) {
	n := 1000
	if v, err := strconv.Atoi(os.Getenv("FLEETGATE_BENCH_DEVICES")); err == nil && v > 0 {
		n = v
	}
	g := testenv.Start(b, testenv.Options{MaxPending: 4096})
	ctx := context.Background()
	type conn struct {
		id   string
		lost chan time.Time
		c    paho.Client
	}
	conns := make([]*conn, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := fmt.Sprintf("rv-%05d", i)
			d := g.EnrollDevice(b, id, "bench")
			cfg, _ := d.TLSConfig("localhost")
			cert, _ := cfg.GetClientCertificate(nil)
			cn := &conn{id: id, lost: make(chan time.Time, 1)}
			cn.c = paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + g.Addrs.MQTT).SetClientID(id).
				SetTLSConfig(&tls.Config{RootCAs: g.Roots(), ServerName: "localhost", Certificates: []tls.Certificate{*cert}}).
				SetAutoReconnect(false).SetKeepAlive(time.Hour).
				SetConnectionLostHandler(func(paho.Client, error) { cn.lost <- time.Now() }))
			if t := cn.c.Connect(); !t.WaitTimeout(30*time.Second) || t.Error() != nil {
				b.Errorf("%s connect: %v", id, t.Error())
				return
			}
			conns[i] = cn
		}()
	}
	wg.Wait()
	if b.Failed() {
		return
	}
	afterReturn := make([]time.Duration, 0, n)
	fromStart := make([]time.Duration, 0, n)
	b.ResetTimer()
	for _, cn := range conns {
		t0 := time.Now()
		if _, err := g.Admin.DeviceAction(ctx, cn.id, "revoke", "bench"); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		select {
		case lost := <-cn.lost:
			afterReturn = append(afterReturn, max(0, lost.Sub(t1)))
			fromStart = append(fromStart, lost.Sub(t0))
		case <-time.After(10 * time.Second):
			b.Fatalf("%s not disconnected 10s after revoke", cn.id)
		}
	}
	b.StopTimer()
	pct := func(ds []time.Duration, p int) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[min(len(s)-1, len(s)*p/100)].Microseconds()) / 1000
	}
	b.ReportMetric(pct(afterReturn, 50), "p50-ms-after-return")
	b.ReportMetric(pct(afterReturn, 99), "p99-ms-after-return")
	b.ReportMetric(pct(fromStart, 50), "p50-ms-from-call")
	b.ReportMetric(pct(fromStart, 99), "p99-ms-from-call")
	b.ReportMetric(float64(n), "devices")
}
