package cluster

import (
	"context"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// The second staleness bound (docs/cluster.md, "Fail closed"). Past the
// first bound (cluster_stale_after, the directory's gate) a node whose
// proven view of revocations is too old refuses every new CONNECT; its
// live sessions go on. Past the second (Config.StaleCloseAfter,
// cluster_stale_close_after) it closes them too, and keeps closing any
// that appears, until its view is proven fresh again:
//   - a device revoked meanwhile on the other nodes must not go on
//     publishing through a node that cannot learn of it;
//   - a node cut off from the majority is dead to the others after
//     Router.deadAfter: they take its sessions over and send their wills,
//     so its own connections must be gone by then (deadAfter is 2 s past
//     this bound);
//   - its clients reconnect, through the load balancer, to a node that
//     can serve them.
//
// The reason code is 0x8B (server shutting down): 0x88 (server
// unavailable) is a CONNACK code, not one MQTT 5 allows in a DISCONNECT
// (§3.14.2.1); 0x8B is, and clients take it as "reconnect, possibly
// elsewhere". The node is not shutting down, but it stops serving until it
// is fresh, and a reconnect to it is refused meanwhile (0x88 in the
// CONNACK). Services are closed as well as devices: their certificates can
// be revoked too, and a service on a cut-off node no longer receives what
// the other nodes route.
//
// Wills of the closed connections go through the OnWill claim (wills.go):
// a node cut off from the quorum cannot claim them, so the surviving node
// that sweeps this node's sessions sends each once; a node that is stale
// but can still write (its watch stalled) claims and sends them itself.

// staleLoop closes this node's sessions while its view is older than
// StaleCloseAfter, until ctx ends.
func (r *Router) staleLoop(ctx context.Context) {
	bound := r.cfg.StaleCloseAfter
	if r.cfg.Stale == nil || bound <= 0 {
		return
	}
	// At most 250 ms late: the survivors sweep this node's sessions 2 s
	// after the bound (deadAfter).
	closing := false
	r.every(ctx, min(max(bound/20, 50*time.Millisecond), 250*time.Millisecond), func() {
		age := r.cfg.Stale()
		if age <= bound {
			if closing {
				r.log.Info("view of revocations fresh again: sessions accepted", "stale_close_after", bound)
			}
			closing = false
			return
		}
		n := r.b.CloseSessions("cluster_stale", packets.ErrServerShuttingDown)
		if !closing || n > 0 {
			r.log.Warn("view of revocations stale past the second bound: closing this node's sessions (MQTT 5: 0x8B)",
				"stale_for", age.Round(time.Millisecond), "stale_close_after", bound, "closed", n)
		}
		closing = true
		r.StaleClosed.Add(int64(n))
	})
}

// every runs fn every d until ctx ends or the router stops.
func (r *Router) every(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.stop:
			return
		case <-t.C:
		}
		fn()
	}
}
