package server

import (
	"context"

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
	s.ready = append(s.ready, s.router.Ready)
}

// runClusterRouter runs the router until ctx ends.
func (s *Server) runClusterRouter(ctx context.Context) error {
	if s.router == nil {
		return nil
	}
	return s.router.Run(ctx)
}
