package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Scenarios 1 and 2: full or resumed TLS handshake + CONNECT/CONNACK.

// Connects runs `workers` clients, each connecting (full mTLS handshake, or
// TLS 1.3 resumption with resume), CONNECT, CONNACK, DISCONNECT, in a loop
// for d. Worker w is device w: one live session per identity. In a
// cluster worker w connects to node w mod 3.
func (e *Env) Connects(ctx context.Context, b *Broker, workers int, d time.Duration, resume bool) (Values, error) {
	if workers > len(e.Devices) {
		return nil, fmt.Errorf("%d workers, %d devices", workers, len(e.Devices))
	}
	dialers := make([]*Dialer, workers)
	cfgs := make([]*tls.Config, workers)
	for w := range cfgs {
		dialers[w] = &Dialer{Addr: b.node(w).MQTT, ServerName: "localhost"}
		var cache tls.ClientSessionCache
		if resume {
			cache = tls.NewLRUClientSessionCache(1)
		}
		cfgs[w] = e.ClientTLS(e.Devices[w], cache)
	}
	if resume { // a first full handshake fills each worker's session cache
		if err := parallel(ctx, workers, 32, func(w int) error {
			c, err := dialers[w].Connect(ctx, cfgs[w], e.Devices[w].Name, 60, 256)
			if err != nil {
				return err
			}
			c.Disconnect()
			return nil
		}); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
	}
	lats := make([][]time.Duration, workers)
	var resumed, fails atomic.Int64
	var firstErr atomic.Value
	meter, err := startCPU(b.PIDs()...)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	deadline := start.Add(d)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := make([]time.Duration, 0, 1024)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				c, err := dialers[w].Connect(ctx, cfgs[w], e.Devices[w].Name, 60, 256)
				if err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, err)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				l = append(l, time.Since(t0))
				if c.Resumed {
					resumed.Add(1)
				}
				c.Disconnect()
			}
			lats[w] = l
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	cpu, err := meter.since()
	if err != nil {
		return nil, err
	}
	all := slices.Concat(lats...)
	slices.Sort(all)
	n := len(all)
	if n == 0 {
		return nil, fmt.Errorf("no connection succeeded: %v", firstErr.Load())
	}
	v := Values{
		"connects/s":          float64(n) / wall.Seconds(),
		"p50 ms":              ms(pct(all, 0.50)),
		"p99 ms":              ms(pct(all, 0.99)),
		"broker CPU µs/conn":  us(cpu) / float64(n),
		"failed":              float64(fails.Load()),
		"resumed %":           100 * float64(resumed.Load()) / float64(n),
		"broker CPU % (of 1)": 100 * cpu.Seconds() / wall.Seconds(),
	}
	if !resume {
		delete(v, "resumed %")
	}
	if f := fails.Load(); f > int64(n/100) {
		// the figures with the error: the cluster scenarios keep both
		return v, fmt.Errorf("%d of %d connects failed, first: %v", f, int64(n)+f, firstErr.Load())
	}
	return v, nil
}
