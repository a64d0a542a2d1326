package bench

import (
	"bytes"
	"strings"
	"testing"
)

// The ratio is taken against the best peer in the metric's direction, and
// the table has a column per broker, the QoS 1 run of mosquitto with its
// raised queue among them.
func TestRatioAgainstBestPeer(t *testing.T) {
	r := &Results{}
	r.Add(S3, "fleetgate", Values{"broker CPU µs/msg": 10, "delivered msgs/s": 30000})
	r.Add(S3, "mosquitto", Values{"broker CPU µs/msg": 16, "delivered msgs/s": 30000})
	r.Add(S3, "nats", Values{"broker CPU µs/msg": 4, "delivered msgs/s": 100000})
	r.Add(S4, "fleetgate", Values{"broker CPU µs/msg": 30, "lost": 0})
	r.Add(S4, "mosquitto", Values{"broker CPU µs/msg": 700, "lost": 40000})
	r.Add(S4, "mosquitto-q100000", Values{"broker CPU µs/msg": 33, "lost": 0})
	r.Add(S4, "nats", Values{"broker CPU µs/msg": 43, "lost": 0})

	cases := []struct {
		scn, name, peer string
		ratio           float64
	}{
		{S3, "broker CPU µs/msg", "nats", 2.5}, // lower is better: the lowest peer
		{S3, "delivered msgs/s", "nats", 0.3},  // higher is better: the highest peer
		{S4, "broker CPU µs/msg", "mosquitto-q100000", 30.0 / 33},
	}
	for _, c := range cases {
		m := r.metric(c.scn, c.name)
		x, peer, ok := m.Ratio()
		if !ok || peer != c.peer || x < c.ratio-1e-9 || x > c.ratio+1e-9 {
			t.Errorf("%s %s: ratio %v vs %q (ok %v), want %v vs %q", c.scn, c.name, x, peer, ok, c.ratio, c.peer)
		}
	}
	if _, _, ok := r.metric(S4, "lost").Ratio(); ok {
		t.Error("a ratio to a peer's 0 is not a number")
	}
	if got := r.Brokers(); strings.Join(got, ",") != "fleetgate,mosquitto,mosquitto-q100000,nats" {
		t.Errorf("brokers %v", got)
	}
	var buf bytes.Buffer
	r.Table(&buf, true)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2+len(r.Metrics) {
		t.Fatalf("table has %d lines, want %d:\n%s", len(lines), 2+len(r.Metrics), buf.String())
	}
	if !strings.Contains(lines[0], "| nats median") || !strings.Contains(lines[0], "fleetgate / best peer") {
		t.Errorf("header %q", lines[0])
	}
	for _, l := range lines[2:] {
		if n := strings.Count(l, "|"); n != 8 {
			t.Errorf("row with %d cells separators, want 8: %q", n, l)
		}
	}
}
