package sim

import (
	"context"
	"fmt"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
)

// revoke revokes a fraction of the fleet mid-run and checks that each is
// cut off and stays off while the rest keep flowing.
func (r *run) revoke(ctx context.Context) error {
	live := r.live()
	k := max(1, int(float64(len(live))*r.cfg.RevokeFraction))
	if k >= len(live) && len(live) > 1 {
		k = len(live) - 1
	}
	victims, rest := live[len(live)-k:], live[:len(live)-k]
	every := 20 * time.Millisecond
	if r.cfg.Interval > 0 {
		every = r.cfg.Interval
	}
	stop := r.publishLoop(ctx, live, every)
	time.Sleep(200 * time.Millisecond) // traffic flows before the revocation
	revokedAt := time.Now()
	seqAtReturn := map[string]int64{}
	var lat []time.Duration
	for _, v := range victims {
		t0 := time.Now()
		if _, err := r.admin.DeviceAction(ctx, v.id, "revoke", "fleetsim revoke scenario"); err != nil {
			stop()
			return fmt.Errorf("revoke %s: %w", v.id, err)
		}
		seqAtReturn[v.id] = v.seq.Load()
		lat = append(lat, time.Since(t0))
		r.progress("revoked %s (call took %s)", v.id, time.Since(t0).Round(time.Microsecond))
	}
	time.Sleep(max(time.Second, 2*every)) // the rest keep publishing; victims try to
	stop()
	r.waitDelivered(ctx, 10*time.Second)
	skip := map[string]bool{}
	for _, v := range victims {
		skip[v.id] = true
		off := waitFor(ctx, 5*time.Second, func() bool { return !v.client().IsConnected() })
		late := r.recv.maxSeq(v.id) > seqAtReturn[v.id]
		r.rep.check("revoked "+v.id+" is cut off and nothing it sent after the revoke is delivered", off && !late,
			"connected=%v, highest delivered seq %d, last seq sent before revoke returned %d", !off, r.recv.maxSeq(v.id), seqAtReturn[v.id])
		_, err := v.dev.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: r.cfg.BrokerAddr, ServerName: r.cfg.ServerName})
		r.rep.check("revoked "+v.id+" cannot reconnect", err != nil, "%v", err)
	}
	flowing := 0
	for _, d := range rest {
		r.recv.mu.Lock()
		for _, at := range r.recv.got[d.id] {
			if at.After(revokedAt.Add(100 * time.Millisecond)) {
				flowing++
				break
			}
		}
		r.recv.mu.Unlock()
	}
	r.rep.check("the rest of the fleet keeps flowing after the revocation", flowing == len(rest), "%d of %d devices delivered after it", flowing, len(rest))
	miss := r.missing(skip)
	r.rep.check("no acknowledged QoS 1 message of the others was lost", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	p50, p99 := percentiles(lat)
	r.rep.RevokeP50, r.rep.RevokeP99 = p50, p99
	var total time.Duration
	for _, l := range lat {
		total += l
	}
	if total > 0 {
		r.rep.RevokesPerSec = float64(len(lat)) / total.Seconds()
	}
	r.progress("revocation: %d devices, revoke call p50 %s p99 %s (%.0f/s one at a time)", k, p50, p99, r.rep.RevokesPerSec)
	return nil
}
