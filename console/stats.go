package console

import (
	"context"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The overview's rates and refusals over time come from the process's own
// metrics, sampled every SampleEvery (the last maxSamples kept): what
// Prometheus would scrape, read in process.

const (
	metricRefusals = "fleetgate_broker_auth_failures_total"
	metricMsgsIn   = "fleetgate_broker_messages_received_total"
	metricMsgsOut  = "fleetgate_broker_messages_sent_total"
	metricConns    = "fleetgate_broker_connections"
	maxSamples     = 120
)

type sample struct {
	at               time.Time
	refusals         map[string]float64 // cumulative, by reason
	msgsIn, msgsOut  float64            // cumulative
	connects         float64            // cumulative, devices (the broker's session watch)
	connsByRole      map[string]float64
	refusalsInPeriod float64 // since the previous sample
}

type stats struct {
	g   prometheus.Gatherer
	now func() time.Time
	// connects counts the devices' connections (Console.OnSession).
	connects atomic.Int64

	mu      sync.Mutex
	samples []sample
}

func newStats(g prometheus.Gatherer, now func() time.Time) *stats {
	return &stats{g: g, now: now}
}

// take reads the metrics once, keeps the sample, and returns the refusals
// by reason since the previous one.
func (s *stats) take() map[string]int {
	if s.g == nil {
		return nil
	}
	mfs, err := s.g.Gather()
	if err != nil {
		return nil
	}
	cur := sample{at: s.now(), refusals: map[string]float64{}, connsByRole: map[string]float64{}, connects: float64(s.connects.Load())}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			label := func(name string) string {
				for _, l := range m.GetLabel() {
					if l.GetName() == name {
						return l.GetValue()
					}
				}
				return ""
			}
			switch mf.GetName() {
			case metricRefusals:
				cur.refusals[label("reason")] += m.GetCounter().GetValue()
			case metricMsgsIn:
				cur.msgsIn += m.GetCounter().GetValue()
			case metricMsgsOut:
				cur.msgsOut += m.GetCounter().GetValue()
			case metricConns:
				cur.connsByRole[label("role")] += m.GetGauge().GetValue()
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var delta map[string]int
	if n := len(s.samples); n > 0 {
		prev := s.samples[n-1]
		for r, v := range cur.refusals {
			if d := v - prev.refusals[r]; d > 0 {
				if delta == nil {
					delta = map[string]int{}
				}
				delta[r] = int(d)
				cur.refusalsInPeriod += d
			}
		}
	}
	s.samples = append(s.samples, cur)
	if len(s.samples) > maxSamples {
		s.samples = s.samples[len(s.samples)-maxSamples:]
	}
	return delta
}

// run samples until ctx ends and publishes new refusals as events.
func (c *Console) run(ctx context.Context) {
	t := time.NewTicker(c.opt.SampleEvery)
	defer t.Stop()
	c.stats.take()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for reason, n := range c.stats.take() {
				c.hub.publish(event{Type: "refused", Reason: reason, Count: n, Time: c.opt.Now().UTC()})
			}
		}
	}
}

// Run samples the metrics for the overview and the live refusals until
// ctx ends.
func (c *Console) Run(ctx context.Context) { c.run(ctx) }

// reasonCount is a refusal reason with its totals.
type reasonCount struct {
	Reason        string
	Total, Recent int
}

// overviewStats is what the overview shows of the samples.
type overviewStats struct {
	Sampled         bool
	MsgsInPerSec    float64
	MsgsOutPerSec   float64
	ConnectsPerSec  float64
	Connections     map[string]int
	Refusals        []reasonCount
	Window          time.Duration
	RefusalsPerStep []int // oldest first, one per sample period
	Step            time.Duration
}

func (s *stats) overview() overviewStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var o overviewStats
	n := len(s.samples)
	if n == 0 {
		return o
	}
	o.Sampled = true
	last, first := s.samples[n-1], s.samples[0]
	o.Connections = map[string]int{}
	for r, v := range last.connsByRole {
		o.Connections[r] = int(v)
	}
	if n >= 2 {
		prev := s.samples[n-2]
		if dt := last.at.Sub(prev.at).Seconds(); dt > 0 {
			o.MsgsInPerSec = (last.msgsIn - prev.msgsIn) / dt
			o.MsgsOutPerSec = (last.msgsOut - prev.msgsOut) / dt
			o.ConnectsPerSec = (last.connects - prev.connects) / dt
		}
		o.Step = last.at.Sub(prev.at).Round(100 * time.Millisecond)
	}
	o.Window = last.at.Sub(first.at).Round(time.Second)
	for r, v := range last.refusals {
		o.Refusals = append(o.Refusals, reasonCount{Reason: r, Total: int(v), Recent: int(v - first.refusals[r])})
	}
	sort.Slice(o.Refusals, func(i, j int) bool {
		if o.Refusals[i].Recent != o.Refusals[j].Recent {
			return o.Refusals[i].Recent > o.Refusals[j].Recent
		}
		return o.Refusals[i].Reason < o.Refusals[j].Reason
	})
	for _, smp := range s.samples[1:] {
		o.RefusalsPerStep = append(o.RefusalsPerStep, int(smp.refusalsInPeriod))
	}
	return o
}
