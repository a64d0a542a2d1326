package server

import (
	"context"
	"time"

	"github.com/fleetgate/fleetgate/broker"
	bcluster "github.com/fleetgate/fleetgate/broker/cluster"
)

// The broker across nodes (broker/cluster) on a cluster node: a router
// hooked into the broker, run beside the cluster's feed. Without cluster
// flags nothing here runs.

// clusterRouter adds the router's hook to bc on a cluster node.
func (s *Server) clusterRouter(bc *broker.Config) error {
	if s.clu == nil {
		return nil
	}
	r, err := bcluster.New(bcluster.Config{NC: s.clu.nc, Node: s.cfg.Cluster.NodeName, Logger: s.log,
		Stale: s.clu.staleFor, StaleCloseAfter: s.cfg.Cluster.closeAfter()})
	if err != nil {
		return err
	}
	s.router = r
	bc.Hooks = append(bc.Hooks, r)
	return nil
}

// bindClusterRouter binds the router to the built broker; until its
// stream is open the node is not ready.
func (s *Server) bindClusterRouter(b *broker.Broker) {
	if s.router == nil {
		return
	}
	s.router.Bind(b)
	s.router.Seed()
	s.prom.MustRegister(s.router.Collectors()...)
	s.ready = append(s.ready, s.router.Ready)
}

// runClusterRouter runs the router until ctx ends.
func (s *Server) runClusterRouter(ctx context.Context) error {
	if s.router == nil {
		return nil
	}
	return s.router.Run(ctx)
}

// boundClusterStop gives the router's cluster writes during the stop (the
// session records and wills of the connections the broker closes) one
// deadline as a whole, cluster_shutdown_timeout; call it before the broker
// closes, and the function it returns after: that logs what was not
// written. A node that lost its quorum would otherwise wait out each
// write's acknowledgement timeout, connection after connection; what it
// did not write, the other nodes' sweep of a silent node does (its
// sessions marked offline, their wills sent once).
func (s *Server) boundClusterStop() func() {
	if s.router == nil {
		return func() {}
	}
	d := s.cfg.Cluster.ShutdownTimeout
	if d <= 0 {
		d = bcluster.DefaultShutdownTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	s.router.Shutdown(ctx)
	t0 := time.Now()
	return func() {
		cancel()
		took := time.Since(t0).Round(time.Millisecond)
		nw := s.router.NotWritten()
		if len(nw) == 0 {
			s.log.Info("cluster node stopping: the session records and wills of its connections written", "took", took)
			return
		}
		s.log.Warn("cluster node stopping: writes not done within the shutdown deadline; the other nodes sweep these sessions (marked offline, wills sent once)",
			"deadline", d, "took", took, "not_written", len(nw), "first", nw[:min(len(nw), 10)])
	}
}
