package sim

import (
	"context"
	"fmt"
	"time"
)

// restart restarts the gateway under load and checks everyone is back and
// nothing acknowledged was lost.
func (r *run) restart(ctx context.Context) error {
	live := r.live()
	stop := r.publishLoop(ctx, live, 50*time.Millisecond)
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	if err := r.gw.restart(ctx); err != nil {
		stop()
		return fmt.Errorf("restart gateway: %w", err)
	}
	r.progress("gateway restarted (pid %d) in %s", r.gw.pid(), time.Since(t0).Round(time.Millisecond))
	back := waitFor(ctx, 60*time.Second, func() bool {
		for _, d := range live {
			if !d.client().IsConnected() {
				return false
			}
		}
		return r.backend.IsConnectionOpen()
	})
	r.progress("devices back after %s", time.Since(t0).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond)
	stop()
	r.waitDelivered(ctx, 20*time.Second)
	n := 0
	for _, d := range live {
		if d.client().IsConnected() {
			n++
		}
	}
	r.rep.check("every device is back after the broker restart", back, "%d/%d reconnected", n, len(live))
	miss := r.missing(nil)
	r.rep.check("no acknowledged QoS 1 message was lost across the restart", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}
