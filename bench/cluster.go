package bench

// The cluster scenarios (issue 13): fleetgate as a 3-node cluster on
// 127.0.0.1..3 beside NATS's own MQTT listener as a 3-node cluster and
// single-node fleetgate. A cluster is one more Broker whose processes are
// its nodes (Broker.Nodes); the scenarios are fanin.go's, connects.go's and
// revoke.go's, which pick a node per client, plus Failover below.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	sim "github.com/fleetgate/fleetgate/firmware-sim"
)

// ClusterNodes is the size of both clusters.
const ClusterNodes = 3

// Names of the two clusters in the results.
const (
	FleetgateCluster = "fleetgate-cluster"
	NATSCluster      = "nats-cluster"
)

// clusterSeed is the data directory every fleetgate cluster node starts
// from: fleetgate's, copied once its first devices were enrolled (Run), so
// that the nodes share the PKI and know those devices, as docs/cluster.md
// has a data directory copied to every node.
func (e *Env) clusterSeed() string { return filepath.Join(e.Work, "cluster-seed") }

// nodeHost is node i's loopback address.
func nodeHost(i int) string { return fmt.Sprintf("127.0.0.%d", i+1) }

// StartFleetgateCluster starts 3 `fleetgate serve` nodes with embedded NATS
// as fleetsim --cluster does (firmware-sim's StartCluster), each from a
// copy of the seed, with a JetStream store that starts empty, and waits
// until every node is ready.
func (e *Env) StartFleetgateCluster(ctx context.Context) (*Broker, error) {
	if _, err := os.Stat(e.clusterSeed()); err != nil {
		return nil, fmt.Errorf("cluster seed: %w", err)
	}
	dir := filepath.Join(e.Work, FleetgateCluster)
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	cl, err := sim.StartCluster(ctx, e.FleetgateBin, dir, e.clusterSeed(), ClusterNodes, slices.Concat(FleetgateServeFlags, e.ExtraServeFlags))
	if err != nil {
		return nil, err
	}
	b := &Broker{Name: FleetgateCluster, close: cl.Close}
	for i := range cl.Len() {
		a := cl.Addrs(i)
		n := &Broker{Name: fmt.Sprintf("%s/node%d", FleetgateCluster, i+1), MQTT: a.MQTT, API: a.API, Metrics: a.Metrics, PID: cl.PID(i)}
		n.kill = func() error { return cl.Kill(i) }
		n.running = func() bool { return cl.PID(i) != 0 }
		n.restart = func(ctx context.Context) error {
			if err := cl.Restart(ctx, i); err != nil {
				return err
			}
			n.PID = cl.PID(i)
			return nil
		}
		b.Nodes = append(b.Nodes, n)
	}
	b.MQTT, b.API, b.Metrics, b.PID = b.Nodes[0].MQTT, b.Nodes[0].API, b.Nodes[0].Metrics, b.Nodes[0].PID
	procs.add(b)
	return b, nil
}

// StartNATSCluster starts 3 nats-server processes with cluster routes,
// JetStream and the MQTT listener configured as the single one
// (writeNATSConfig), and waits until each node's MQTT listener answers a
// CONNECT with a CONNACK (its JetStream cluster formed).
func (e *Env) StartNATSCluster(ctx context.Context) (*Broker, error) {
	nodes := make([]natsNode, ClusterNodes)
	for i := range nodes {
		host := nodeHost(i)
		port, err := freePortOn(host)
		if err != nil {
			return nil, err
		}
		route, err := freePortOn(host)
		if err != nil {
			return nil, err
		}
		nodes[i] = natsNode{name: fmt.Sprintf("%s-node%d", NATSCluster, i+1), host: host, port: port,
			cluster: &natsRoutes{listen: fmt.Sprintf("%s:%d", host, route)}}
	}
	for i := range nodes {
		for j := range nodes {
			if j != i {
				nodes[i].cluster.routes = append(nodes[i].cluster.routes, nodes[j].cluster.listen)
			}
		}
	}
	b := &Broker{Name: NATSCluster}
	for _, n := range nodes {
		nb, err := e.startNATSNode(ctx, n)
		if err != nil {
			b.Stop()
			return nil, err
		}
		nb.kill = func() error { return nb.proc.Kill() }
		nb.restart = func(ctx context.Context) error {
			// its store kept, as a restarted server has it
			conf := filepath.Join(n.dir(e), "nats.conf")
			r, err := e.spawnPeer(ctx, n.name, NATSBin, []string{"-c", conf}, nb.MQTT)
			if err != nil {
				return err
			}
			nb.proc, nb.PID = r.proc, r.PID
			return e.waitConnack(ctx, nb.MQTT)
		}
		b.Nodes = append(b.Nodes, nb)
	}
	b.MQTT, b.PID = b.Nodes[0].MQTT, b.Nodes[0].PID
	for _, n := range b.Nodes {
		if err := e.waitConnack(ctx, n.MQTT); err != nil {
			b.Stop()
			return nil, err
		}
	}
	return b, nil
}

// waitConnack connects the backend to addr until a CONNACK accepts it (at
// most 90 s).
func (e *Env) waitConnack(ctx context.Context, addr string) error {
	dialer := &Dialer{Addr: addr, ServerName: "localhost", Timeout: 10 * time.Second}
	deadline := time.Now().Add(90 * time.Second)
	for {
		c, err := dialer.Connect(ctx, e.ClientTLS(e.Backend, nil), e.Backend.Name, 60, 256)
		if err == nil {
			c.Disconnect()
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: no CONNACK within 90 s: %w", addr, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// Failover connects n devices to the cluster's last node and the backend
// subscriber to the first; every device publishes QoS 1 telemetry paced at
// perDevice messages per second. After warm, the last node is SIGKILLed;
// each device reconnects to a survivor (device i to node i mod 2 first,
// then the other) and goes on publishing. It measures the time from the
// kill until every device has a CONNACK from a survivor, and the messages
// acknowledged to a device (by any node) that the subscriber never
// received. The killed node is restarted at the end.
func (e *Env) Failover(ctx context.Context, b *Broker, n int, perDevice float64, warm time.Duration) (Values, error) {
	if len(b.Nodes) < 2 {
		return nil, errors.New("failover needs a cluster")
	}
	if n > len(e.Devices) {
		return nil, fmt.Errorf("%d devices, %d enrolled", n, len(e.Devices))
	}
	victim := b.Nodes[len(b.Nodes)-1]
	survivors := b.Nodes[:len(b.Nodes)-1]
	sub, err := e.subscribeTelemetry(ctx, b.Nodes[0].MQTT, n, 1)
	if err != nil {
		return nil, err
	}
	defer sub.stop()
	conns, err := e.connectDevices(ctx, n, func(int) string { return victim.MQTT })
	if err != nil {
		return nil, fmt.Errorf("devices on %s: %w", victim.Name, err)
	}
	defer func() { closeAll(conns) }()

	acked := make([]bitset, n)
	var total, pubErrs, gaveUp, settled atomic.Int64
	var firstErr atomic.Value
	var killed atomic.Int64 // Unix nanoseconds of the SIGKILL
	back := make([]time.Duration, n)
	done := make(chan struct{})
	settle := func() { // once per device: back on a survivor, or given up
		if settled.Add(1) == int64(n) {
			close(done)
		}
	}
	pubCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	far := time.Now().Add(time.Hour)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "devices/" + e.Devices[i].Name + "/telemetry"
			o := qos1Opts{window: 4, every: time.Duration(float64(time.Second) / perDevice)}
			c := conns[i]
			for phase := 0; ; phase++ {
				acks, next, err := publishQoS1(pubCtx, c, uint32(i), topic, far, o, &acked[i])
				total.Add(acks)
				o.seq = next
				if pubCtx.Err() != nil {
					return
				}
				if err != nil && (phase > 0 || killed.Load() == 0) {
					pubErrs.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
				if phase > 0 {
					return // a survivor closed it
				}
				// back to a survivor, bounded (60 s; 5 s per attempt)
				giveUp := time.Now().Add(60 * time.Second)
				for k := 0; ; k++ {
					node := survivors[(i+k)%len(survivors)]
					c, err = (&Dialer{Addr: node.MQTT, ServerName: "localhost", Timeout: 5 * time.Second}).Connect(pubCtx, e.ClientTLS(e.Devices[i], nil), e.Devices[i].Name, 60, 4096)
					if err == nil {
						break
					}
					if pubCtx.Err() != nil || time.Now().After(giveUp) {
						gaveUp.Add(1)
						settle()
						return
					}
					time.Sleep(100 * time.Millisecond)
				}
				if t := killed.Load(); t > 0 {
					back[i] = time.Duration(time.Now().UnixNano() - t)
				}
				conns[i] = c
				settle()
			}
		}()
	}
	select {
	case <-time.After(warm):
	case <-ctx.Done():
	}
	killed.Store(time.Now().UnixNano())
	if err := victim.kill(); err != nil {
		cancel()
		wg.Wait()
		return nil, fmt.Errorf("kill %s: %w", victim.Name, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
	}
	// a little traffic on the survivors after the last device came back
	select {
	case <-time.After(warm):
	case <-ctx.Done():
	}
	cancel()
	wg.Wait()
	sub.drain(ctx, total.Load())
	sub.stop()
	closeAll(conns)
	restartErr := victim.restart(ctx)

	var backs []time.Duration
	for _, d := range back {
		if d > 0 {
			backs = append(backs, d)
		}
	}
	slices.Sort(backs)
	v := Values{
		"devices back (of n)":    float64(len(backs)),
		"all back after kill ms": ms(pct(backs, 1)),
		"back p50 ms":            ms(pct(backs, 0.5)),
		"QoS 1 acked, lost":      float64(sub.lost(acked)),
		"acked by broker":        float64(total.Load()),
		"duplicates":             float64(sub.dups.Load()),
		"publisher errors":       float64(pubErrs.Load()),
	}
	if len(backs) < n {
		delete(v, "all back after kill ms") // not all back: no such time
	}
	if len(backs) == 0 {
		delete(v, "back p50 ms")
	}
	var errs []error
	if gaveUp.Load() > 0 {
		errs = append(errs, fmt.Errorf("%d devices not back within 60 s", gaveUp.Load()))
	}
	if total.Load() == 0 {
		errs = append(errs, errors.New("no QoS 1 message acknowledged: no loss to count"))
	}
	errs = append(errs, sub.cutErr())
	if restartErr != nil {
		errs = append(errs, fmt.Errorf("restart %s: %w", victim.Name, restartErr))
	}
	return v, errors.Join(errs...)
}
