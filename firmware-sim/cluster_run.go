package sim

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"time"

	adminclient "github.com/fleetgate/fleetgate/operator/client"
)

// setupCluster starts cfg.Cluster nodes and points the run at node 1: its
// API enrolls the fleet (the registry's records are per node, so one node
// enrolls, docs/cluster.md), the backend service connects to it first,
// and the devices are spread over every node.
func (r *run) setupCluster(ctx context.Context) error {
	cfg := &r.cfg
	bin := cfg.FleetgateBin
	if bin == "" {
		var err error
		if bin, err = findFleetgate(); err != nil {
			return fmt.Errorf("--cluster needs the fleetgate binary (next to fleetsim or on PATH): %w", err)
		}
	}
	t0 := time.Now()
	cl, err := startCluster(ctx, bin, cfg.WorkDir, cfg.Cluster, nil, r.onNodeStart)
	if cl != nil {
		r.cl = cl
	}
	if err != nil {
		return err
	}
	for _, nd := range cl.nodes {
		r.progress("%s started (pid %d): MQTT %s, API %s, NATS routes on %s, log %s", nd.name, nd.pid(), nd.addrs.MQTT, nd.addrs.API, nd.listen, nd.logFile)
	}
	if err := cl.waitReady(ctx, 90*time.Second); err != nil {
		return fmt.Errorf("cluster: %w (logs under %s)", err, cfg.WorkDir)
	}
	r.progress("cluster of %d nodes ready (every /readyz 200) %s after the first start", len(cl.nodes), time.Since(t0).Round(time.Millisecond))
	for _, nd := range cl.nodes {
		r.mqttAddrs = append(r.mqttAddrs, nd.addrs.MQTT)
	}
	n1 := cl.nodes[0]
	cfg.DataDir, cfg.ServerURL, cfg.BrokerAddr = n1.dataDir, "https://"+n1.addrs.API, n1.addrs.MQTT
	return nil
}

func (r *run) onNodeStart(pids []int) {
	if r.cfg.OnCluster != nil {
		r.cfg.OnCluster(pids)
	}
}

// adminOf is an operator client of node i's API (made once).
func (r *run) adminOf(i int) (*adminclient.Client, error) {
	r.adminMu.Lock()
	defer r.adminMu.Unlock()
	if r.admins == nil {
		r.admins = map[int]*adminclient.Client{}
	}
	if c := r.admins[i]; c != nil {
		return c, nil
	}
	nd := r.cl.nodes[i]
	c, err := adminclient.New("https://"+nd.addrs.API, adminclient.FromDataDir(nd.dataDir))
	if err == nil {
		r.admins[i] = c
	}
	return c, err
}

// nodeIndex is the index of the node whose MQTT address is addr (-1).
func (r *run) nodeIndex(addr string) int {
	for i, a := range r.mqttAddrs {
		if a == addr {
			return i
		}
	}
	return -1
}

// nodeStats lists the nodes with their memory now (before the devices).
func (r *run) nodeStats() []NodeStat {
	var out []NodeStat
	for _, nd := range r.cl.nodes {
		out = append(out, NodeStat{Name: nd.name, PID: nd.pid(), MQTT: nd.addrs.MQTT, API: nd.addrs.API, RSSBeforeKB: rssKB(nd.pid())})
	}
	return out
}

// nodeMemory records each node's memory with the fleet connected, and how
// many devices each holds.
func (r *run) nodeMemory() {
	for _, d := range r.live() {
		if i := r.nodeIndex(d.broker()); i >= 0 && i < len(r.rep.Nodes) {
			r.rep.Nodes[i].Devices++
		}
	}
	var grew int64
	for i := range r.rep.Nodes {
		r.rep.Nodes[i].RSSAfterKB = rssKB(r.rep.Nodes[i].PID)
		grew += r.rep.Nodes[i].RSSAfterKB - r.rep.Nodes[i].RSSBeforeKB
	}
	r.rep.RSSPerConnectionKB = float64(grew) / float64(r.rep.Connected)
}

// devicesOn lists the live devices connected to node i, by ID.
func (r *run) devicesOn(i int, skip map[string]bool) []*device {
	var out []*device
	for _, d := range r.live() {
		if !skip[d.id] && d.client().IsConnected() && r.nodeIndex(d.broker()) == i {
			out = append(out, d)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].id < out[b].id })
	return out
}

// nodeLogs is where the nodes' logs are (for failure messages).
func (r *run) nodeLogs() string {
	return filepath.Join(r.cfg.WorkDir, "node*.log")
}
