package bench

import (
	"fmt"
	"io"
)

// The cluster scenarios' table: fleetgate's cluster, NATS's cluster and
// single-node fleetgate side by side, the ratio cluster / single node, and
// issue 13's targets.

// clusterColumns are the brokers of the cluster table, in order.
var clusterColumns = []string{FleetgateCluster, NATSCluster, "fleetgate"}

// clusterTarget is one of issue 13's targets: the metric it reads and
// whether the measured figures meet it.
type clusterTarget struct {
	scenario, metric, text string
	met                    func(m *Metric) (bool, bool) // (met, measured)
}

// ratioAtMost: the fleetgate cluster's median over single-node fleetgate's
// is at most x.
func ratioAtMost(x float64) func(m *Metric) (bool, bool) {
	return func(m *Metric) (bool, bool) {
		r, ok := m.ClusterRatio()
		return ok && r <= x, ok
	}
}

// clusterBelow: every repetition of the fleetgate cluster is below x.
func clusterBelow(x float64) func(m *Metric) (bool, bool) {
	return func(m *Metric) (bool, bool) {
		s, ok := stat(m.Values[FleetgateCluster])
		return ok && s.Max < x, ok
	}
}

var clusterTargets = []clusterTarget{
	{SA, "broker CPU µs/conn", "≤ 1.10× single node", ratioAtMost(1.10)},
	{SB, "broker CPU µs/msg", "≤ 1.5× single node", ratioAtMost(1.5)},
	{SC, "broker CPU µs/msg", "≤ 1.5× single node", ratioAtMost(1.5)},
	{SD, "delivery p99 ms", "< 20 ms (at 10k msgs/s: see acked msgs/s)", clusterBelow(20)},
	{SE, "revoke→closed p99 ms", "< 100 ms", clusterBelow(100)},
	{SF, "QoS 1 acked, lost", "0 in every run", clusterBelow(1)},
}

// ClusterRatio is the fleetgate cluster's median over single-node
// fleetgate's, when both exist and the latter is not 0.
func (m *Metric) ClusterRatio() (float64, bool) {
	c, ok1 := stat(m.Values[FleetgateCluster])
	f, ok2 := stat(m.Values["fleetgate"])
	if !ok1 || !ok2 || f.Median == 0 {
		return 0, false
	}
	return c.Median / f.Median, true
}

// target is the metric's issue 13 target and how it stands ("" if none).
func (m *Metric) target() string {
	for _, t := range clusterTargets {
		if t.scenario != m.Scenario || t.metric != m.Name {
			continue
		}
		switch met, measured := t.met(m); {
		case !measured:
			return t.text + ": not measured"
		case met:
			return t.text + ": met"
		default:
			return t.text + ": NOT met"
		}
	}
	return ""
}

// ClusterTable writes the cluster scenarios' table (tab-aligned or, with
// md, Markdown); it writes nothing when the run had none.
func (r *Results) ClusterTable(w io.Writer, md bool) {
	head := []string{"scenario", "metric"}
	for _, b := range clusterColumns {
		head = append(head, b+" median [min–max]")
	}
	head = append(head, "cluster / single node", "issue 13 target")
	var rows [][]string
	for _, m := range r.Metrics {
		if !isCluster(m.Scenario) {
			continue
		}
		ratio := ""
		if x, ok := m.ClusterRatio(); ok {
			ratio = fmt.Sprintf("%.2f", x)
			if m.Better != "" {
				ratio += " (" + m.Better + " is better)"
			}
		}
		rows = append(rows, append(m.cells(clusterColumns), ratio, m.target()))
	}
	if len(rows) > 0 {
		table(w, md, head, rows)
	}
}
