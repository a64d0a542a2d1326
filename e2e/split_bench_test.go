package e2e

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/adminclient"
	"github.com/fleetgate/fleetgate/internal/testenv"
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
	brk := serve(b, e.dataDir, "--only", "broker", "--enroll-url", "https://"+enr.Addrs.API, "--max-pending-per-ip", "4096")
	waitReady(b, brk)
	admin, err := adminclient.New("https://"+enr.Addrs.API, adminclient.FromDataDir(e.dataDir))
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
			_, lost := connectWatched(b, e, brk.Addrs.MQTT, d)
			conns[i] = conn{id: id, lost: lost}
		}()
	}
	wg.Wait()
	devs := make([]testenv.Revokee, 0, n)
	for _, c := range conns {
		devs = append(devs, testenv.Revokee{ID: c.id, Lost: c.lost})
	}
	testenv.MeasureRevocations(b, admin, devs)
}
