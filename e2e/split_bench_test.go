package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/adminclient"
)

// BenchmarkSplitRevokeToDisconnect: broker and enrollment service as two
// processes; devices connected to the broker are revoked one by one through
// the enrollment service; the client side measures the time from the revoke
// call returning (and starting) to its connection being closed. Run once:
//
//	go test -run '^$' -bench SplitRevoke -benchtime 1x ./e2e/
//
// FLEETGATE_BENCH_DEVICES sets the number of devices (default 200).
func BenchmarkSplitRevokeToDisconnect(b *testing.B) {
	n := 200
	if v, err := strconv.Atoi(os.Getenv("FLEETGATE_BENCH_DEVICES")); err == nil && v > 0 {
		n = v
	}
	e := initData(b)
	enr := serve(b, e.dataDir, "--only", "enroll")
	e.srv = enr
	brk := serve(b, e.dataDir, "--only", "broker", "--enroll-url", "https://"+enr.addrs.API, "--max-pending-per-ip", "4096")
	waitReady(b, brk)
	admin, err := adminclient.New("https://"+enr.addrs.API, adminclient.FromDataDir(e.dataDir))
	if err != nil {
		b.Fatal(err)
	}
	type conn struct {
		id   string
		lost chan time.Time
	}
	conns := make([]conn, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	var mu sync.Mutex
	for i := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := fmt.Sprintf("srv-%04d", i)
			mu.Lock() // e.enroll uses the test's temp dirs and the CLI
			d, _ := e.enroll(id, "bench")
			mu.Unlock()
			_, lost := connectWatched(b, e, brk.addrs.MQTT, d)
			conns[i] = conn{id: id, lost: lost}
		}()
	}
	wg.Wait()
	ctx := context.Background()
	var afterReturn, fromStart []time.Duration
	b.ResetTimer()
	for _, c := range conns {
		t0 := time.Now()
		if _, err := admin.DeviceAction(ctx, c.id, "revoke", "bench"); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		select {
		case at := <-c.lost:
			afterReturn = append(afterReturn, max(0, at.Sub(t1)))
			fromStart = append(fromStart, at.Sub(t0))
		case <-time.After(10 * time.Second):
			b.Fatalf("%s not disconnected within 10s of its revocation", c.id)
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
