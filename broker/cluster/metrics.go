package cluster

import "github.com/prometheus/client_golang/prometheus"

// Collectors are the router's metrics, for the node's /metrics: what it
// routed to and received from the other nodes, and where its QoS 1/2 feed
// (q1feed.go) stands in the stream.
func (r *Router) Collectors() []prometheus.Collector {
	counter := func(name, help string, v func() int64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, func() float64 { return float64(v()) })
	}
	gauge := func(name, help string, v func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, v)
	}
	return []prometheus.Collector{
		counter("fleetgate_cluster_routed_total", "Messages this node sent to the other nodes (QoS 0 on core NATS, QoS 1/2 acknowledged by the stream).", r.Routed.Load),
		counter("fleetgate_cluster_received_total", "Messages from the other nodes handed to this node's broker.", r.Received.Load),
		gauge("fleetgate_cluster_q1_feed_applied_sequence", "Sequence of stream fg_Q1 this node's QoS 1/2 feed applied last.", func() float64 { return float64(r.q1.last.Load()) }),
		gauge("fleetgate_cluster_q1_feed_behind", "1 while the QoS 1/2 feed may not have applied everything the stream holds (interrupted, more pending, or the stream's leader holds more than the feed applied at the last check).", func() float64 {
			if r.q1.isBehind() {
				return 1
			}
			return 0
		}),
		counter("fleetgate_cluster_q1_feed_dropped_total", "Stream messages the feed skipped: this node's own, or no local session subscribes to the topic.", r.q1.dropped.Load),
		counter("fleetgate_cluster_revoked_dropped_total", "Routed messages (live or replayed) not delivered because their publisher is a device revoked in this node's directory.", r.RevokedDropped.Load),
		counter("fleetgate_cluster_q1_feed_restarts_total", "Times the feed's consumer had to be created again (after an error or a stop).", r.q1.restarts.Load),
	}
}
