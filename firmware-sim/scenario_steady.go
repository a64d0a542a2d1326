package sim

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
)

// steady: every device publishes cfg.Messages messages.
func (r *run) steady(ctx context.Context) {
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, d := range r.live() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range r.cfg.Messages {
				r.publish(ctx, d)
				if r.cfg.Interval > 0 {
					select {
					case <-time.After(r.cfg.Interval):
					case <-ctx.Done():
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	r.waitDelivered(ctx, 10*time.Second)
	if el := time.Since(t0).Seconds(); el > 0 {
		r.rep.MsgsPerSec = float64(r.recv.count()) / el
	}
	r.progress("telemetry: %d messages delivered to the backend (%.0f msg/s)", r.recv.count(), r.rep.MsgsPerSec)
}

// steadyChecks: delivery, a command round trip, and the policy.
func (r *run) steadyChecks(ctx context.Context) {
	miss := r.missing(nil)
	r.rep.check("every acknowledged QoS 1 message reached the backend", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	live := r.live()
	if len(live) == 0 {
		return
	}
	t0 := time.Now()
	target := live[0]
	r.backend.Publish("devices/"+target.id+"/commands/ping", 1, false, "ping").WaitTimeout(5 * time.Second)
	select {
	case id := <-r.recv.pongs:
		r.rep.CommandRTT = time.Since(t0)
		r.rep.check("command round trip backend -> device -> backend", id == target.id, "%s answered in %s", id, r.rep.CommandRTT.Round(time.Microsecond))
		r.progress("command round trip to %s: %s", id, r.rep.CommandRTT.Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		r.rep.check("command round trip backend -> device -> backend", false, "no answer within 10s")
	}
	if len(live) < 2 {
		return
	}
	a, b := live[0], live[1]
	before := r.recv.maxSeq(b.id)
	forged, _ := json.Marshal(telemetry{Device: b.id, Seq: 1 << 40, Kind: "temp"})
	_ = a.client().Publish(ctx, "devices/"+b.id+"/telemetry/temp", 0, false, forged)
	subErr := a.client().Subscribe(ctx, "devices/"+b.id+"/commands/#", 1, func(devicesdk.Message) {})
	// A marker from a on its own topic after the forgery: once it arrives,
	// the forgery would have too.
	r.publish(ctx, a)
	r.waitDelivered(ctx, 5*time.Second)
	r.rep.check("a device publishing into another device's topic is not delivered", r.recv.maxSeq(b.id) == before,
		"%s -> devices/%s/telemetry/temp dropped by the broker's policy", a.id, b.id)
	r.rep.check("a device subscribing to another device's commands is refused", errors.Is(subErr, devicesdk.ErrSubscriptionRefused),
		"%s -> devices/%s/commands/#: %v", a.id, b.id, subErr)
	r.progress("policy: %s publishing into devices/%s/... was dropped; subscribing to its commands was refused", a.id, b.id)
}
