package console

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The overview's rates and refusals come from two samples of the metrics.
func TestStatsFromMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	ref := prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricRefusals}, []string{"reason"})
	in := prometheus.NewCounter(prometheus.CounterOpts{Name: metricMsgsIn})
	conns := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricConns}, []string{"role"})
	reg.MustRegister(ref, in, conns)
	now := time.Unix(1000, 0)
	s := newStats(reg, func() time.Time { return now })
	ref.WithLabelValues("revoked").Add(2)
	if d := s.take(); d != nil {
		t.Fatalf("first sample reported %v", d)
	}
	now = now.Add(10 * time.Second)
	ref.WithLabelValues("revoked").Add(3)
	ref.WithLabelValues("unknown_issuer").Inc()
	in.Add(50)
	conns.WithLabelValues("device").Set(7)
	s.connects.Add(20)
	d := s.take()
	if d["revoked"] != 3 || d["unknown_issuer"] != 1 || len(d) != 2 {
		t.Fatalf("delta %v", d)
	}
	o := s.overview()
	if o.MsgsInPerSec != 5 || o.ConnectsPerSec != 2 || o.Connections["device"] != 7 || o.Window != 10*time.Second {
		t.Fatalf("overview %+v", o)
	}
	if len(o.Refusals) != 2 || o.Refusals[0].Reason != "revoked" || o.Refusals[0].Recent != 3 || o.Refusals[0].Total != 5 {
		t.Fatalf("refusals %+v", o.Refusals)
	}
	if len(o.RefusalsPerStep) != 1 || o.RefusalsPerStep[0] != 4 {
		t.Fatalf("per step %v", o.RefusalsPerStep)
	}
}
