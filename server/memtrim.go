package server

import (
	"context"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// A broker for fleets spends most of its life holding idle connections.
// Go's collector lets the heap grow to twice the live data before it
// collects (GOGC=100), and returns freed memory to the OS only gradually;
// after a burst (a reconnect storm, an enrollment wave) the process keeps
// the burst's headroom for minutes although nothing allocates. The trimmer
// watches the allocation rate: once a burst of at least trimBurst bytes is
// followed by a quiet tick (less than trimQuiet allocated), it runs one
// collection and returns free memory to the OS (debug.FreeOSMemory). While
// traffic flows it does nothing, so it costs no CPU on the hot paths; a
// trim costs one collection, paid only after bursts.
const (
	trimInterval = time.Second
	trimBurst    = 32 << 20
	trimQuiet    = 4 << 20
)

// trimmer decides when to trim from the cumulative bytes allocated. Only
// busy ticks (at least trimQuiet allocated) count towards a burst, so a
// steady light load — a large fleet's keepalives — never triggers a trim.
type trimmer struct {
	last, burst uint64
	started     bool
}

// observe takes the cumulative allocation counter at one tick and reports
// whether to trim now.
func (t *trimmer) observe(total uint64) bool {
	if !t.started {
		t.started, t.last = true, total
		return false
	}
	d := total - t.last
	t.last = total
	if d >= trimQuiet {
		t.burst += d
		return false
	}
	trim := t.burst >= trimBurst
	t.burst = 0
	return trim
}

// trimMemory runs until ctx is done.
func trimMemory(ctx context.Context, trimmed func()) {
	sample := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	var t trimmer
	tick := time.NewTicker(trimInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(sample)
		if sample[0].Value.Kind() != metrics.KindUint64 {
			return
		}
		if t.observe(sample[0].Value.Uint64()) {
			// Each collection also halves the stacks of goroutines that use
			// less than a quarter of theirs (idle connections' read loops
			// grew while handling CONNECT): two collections, then the
			// freed memory goes back.
			runtime.GC()
			debug.FreeOSMemory()
			if trimmed != nil {
				trimmed()
			}
		}
	}
}
