package broker_test

import (
	"crypto/tls"
	"fmt"
	"os"
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
	devs := make([]testenv.Revokee, 0, n)
	for _, cn := range conns {
		devs = append(devs, testenv.Revokee{ID: cn.id, Lost: cn.lost})
	}
	testenv.MeasureRevocations(b, g.Admin, devs)
}
