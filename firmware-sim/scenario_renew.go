package sim

import (
	"context"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
)

// renewScenario: short certificates; every device renews at 2/3 of the
// lifetime and moves its session to the new certificate, under traffic.
func (r *run) renewScenario(ctx context.Context) error {
	live := r.live()
	stop := r.publishLoop(ctx, live, 100*time.Millisecond)
	rctx, cancel := context.WithCancel(ctx)
	var rwg sync.WaitGroup
	for _, d := range live {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			_ = d.dev.AutoRenew(rctx, devicesdk.RenewOptions{OnRenewed: func() {
				d.renew.Add(1)
				// Move the session onto the new certificate.
				nc, err := d.dev.Connect(rctx, r.deviceOpts(d))
				if err != nil {
					return
				}
				d.mu.Lock()
				old := d.c
				d.c = nc
				d.mu.Unlock()
				old.Close()
			}})
		}()
	}
	ok := waitFor(ctx, 3*r.cfg.CertTTL, func() bool {
		for _, d := range live {
			if d.renew.Load() == 0 {
				return false
			}
		}
		return true
	})
	cancel()
	rwg.Wait()
	time.Sleep(200 * time.Millisecond)
	stop()
	r.waitDelivered(ctx, 10*time.Second)
	n := 0
	for _, d := range live {
		if d.renew.Load() > 0 {
			n++
		}
	}
	r.rep.check("every device renewed its certificate before expiry", ok, "%d/%d renewed (lifetime %s)", n, len(live), r.cfg.CertTTL)
	miss := r.missing(nil)
	r.rep.check("no acknowledged QoS 1 message was lost across renewals", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}
