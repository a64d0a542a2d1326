package bench

import (
	"bytes"
	"strings"
	"testing"
)

// The cluster table has a column per cluster and single-node fleetgate,
// the ratio cluster / single node, and each issue 13 target met or not
// from the figures; the single-node table leaves the cluster scenarios out.
func TestClusterTableRatiosAndTargets(t *testing.T) {
	r := &Results{}
	r.Add(S3, "fleetgate", Values{"broker CPU µs/msg": 10})
	r.Add(S3, "nats", Values{"broker CPU µs/msg": 5})
	r.Add(SA, FleetgateCluster, Values{"broker CPU µs/conn": 1200})
	r.Add(SA, "fleetgate", Values{"broker CPU µs/conn": 1000})
	r.Add(SA, NATSCluster, Values{"broker CPU µs/conn": 900})
	for _, v := range []float64{28, 32} {
		r.Add(SC, FleetgateCluster, Values{"broker CPU µs/msg": v})
	}
	r.Add(SC, "fleetgate", Values{"broker CPU µs/msg": 20})
	r.Add(SD, FleetgateCluster, Values{"delivery p99 ms": 12})
	r.Add(SD, FleetgateCluster, Values{"delivery p99 ms": 25}) // one repetition over: not met
	r.Add(SE, FleetgateCluster, Values{"revoke→closed p99 ms": 40})
	r.Add(SF, FleetgateCluster, Values{"QoS 1 acked, lost": 0})
	r.Add(SF, NATSCluster, Values{"QoS 1 acked, lost": 3})

	cases := []struct {
		scn, name string
		ratio     float64
		ok        bool
		target    string
	}{
		{SA, "broker CPU µs/conn", 1.2, true, "≤ 1.10× single node: NOT met"},
		{SC, "broker CPU µs/msg", 1.5, true, "≤ 1.5× single node: met"}, // median 30 / 20
		{SD, "delivery p99 ms", 0, false, "NOT met"},
		{SE, "revoke→closed p99 ms", 0, false, "< 100 ms: met"},
		{SF, "QoS 1 acked, lost", 0, false, "0 in every run: met"}, // NATS's loss is not fleetgate's target
	}
	for _, c := range cases {
		m := r.metric(c.scn, c.name)
		x, ok := m.ClusterRatio()
		if ok != c.ok || ok && (x < c.ratio-1e-9 || x > c.ratio+1e-9) {
			t.Errorf("%s %s: ratio %v (ok %v), want %v (ok %v)", c.scn, c.name, x, ok, c.ratio, c.ok)
		}
		if got := m.target(); !strings.HasSuffix(got, c.target) {
			t.Errorf("%s %s: target %q, want …%q", c.scn, c.name, got, c.target)
		}
	}
	if got := strings.Join(r.Brokers(), ","); got != "fleetgate,nats" {
		t.Errorf("single-node table's brokers %s", got)
	}

	var buf bytes.Buffer
	r.ClusterTable(&buf, true)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if want := 2 + len(r.Metrics) - 1; len(lines) != want {
		t.Fatalf("cluster table has %d lines, want %d:\n%s", len(lines), want, buf.String())
	}
	for _, h := range []string{"| " + FleetgateCluster + " median", "| " + NATSCluster + " median", "| fleetgate median", "cluster / single node", "issue 13 target"} {
		if !strings.Contains(lines[0], h) {
			t.Errorf("header %q lacks %q", lines[0], h)
		}
	}
	for _, l := range lines[2:] {
		if n := strings.Count(l, "|"); n != 8 {
			t.Errorf("row with %d cell separators, want 8: %q", n, l)
		}
	}
	if !strings.Contains(buf.String(), "| 1.20 (lower is better) | ≤ 1.10× single node: NOT met |") {
		t.Errorf("connect row without its ratio and target:\n%s", buf.String())
	}
	buf.Reset()
	r.Table(&buf, true)
	if strings.Contains(buf.String(), "cluster") {
		t.Errorf("the single-node table shows cluster scenarios:\n%s", buf.String())
	}
}
