package sim

import (
	"context"
	"sync"
	"time"
)

// storm: every device drops its connection and reconnects at once.
func (r *run) storm(ctx context.Context) error {
	live := r.live()
	for _, d := range live {
		d.client().Close()
	}
	r.progress("storm: %d devices reconnect at once", len(live))
	lat := make([]time.Duration, len(live))
	errs := make([]error, len(live))
	var wg sync.WaitGroup
	for i, d := range live {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			c, err := d.dev.Connect(ctx, r.deviceOpts(d))
			if err != nil {
				errs[i] = err
				return
			}
			lat[i] = time.Since(t0)
			d.mu.Lock()
			d.c = c
			d.mu.Unlock()
		}()
	}
	wg.Wait()
	failed := 0
	for _, e := range errs {
		if e != nil {
			failed++
		}
	}
	p50, p99 := percentiles(lat)
	r.rep.check("every device reconnected in the storm", failed == 0, "%d failed; reconnect p50 %s p99 %s", failed, p50, p99)
	for _, d := range live {
		r.publish(ctx, d)
	}
	r.waitDelivered(ctx, 10*time.Second)
	miss := r.missing(nil)
	r.rep.check("traffic flows after the storm, nothing acknowledged lost", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}
