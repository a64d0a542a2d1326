package bench

import (
	"context"
	"os"
	"slices"
	"strings"
	"time"

	sim "github.com/fleetgate/fleetgate/firmware-sim"
)

// clusterLayout places the cluster scenarios' devices: the cluster's seed
// holds devices [0, seed); the fleetgate cluster revokes devices from
// [low, seed), ClusterRevoke per repetition; single-node fleetgate, whose
// registry other scenarios (6) revoke from too, revokes the same number
// from [single, total), enrolled after the seed.
type clusterLayout struct {
	low, seed, single, total int
}

func newClusterLayout(cfg Config, nDev int) clusterLayout {
	var l clusterLayout
	l.low = max(cfg.ConnectWorkers, cfg.Publishers, cfg.FailoverDevices)
	l.seed = l.low + cfg.ClusterReps*cfg.ClusterRevoke
	l.single = max(nDev, l.seed)
	l.total = l.single + cfg.ClusterReps*cfg.ClusterRevoke
	return l
}

// revokeRange is repetition rep's devices to revoke on broker name.
func (l clusterLayout) revokeRange(name string, rep, n int) (int, int) {
	lo := l.low
	if name != FleetgateCluster {
		lo = l.single
	}
	return lo + rep*n, lo + (rep+1)*n
}

// seedCluster makes sure the cluster's seed exists: fleetgate's data
// directory once devices [0, n) are enrolled, copied while fleetgate is
// stopped. It returns fleetgate running again.
func (e *Env) seedCluster(ctx context.Context, fg *Broker, n int) (*Broker, error) {
	if _, err := os.Stat(e.clusterSeed()); err == nil {
		return fg, nil
	}
	e.Logf("cluster seed: %d devices enrolled, then fleetgate's data directory copied for the cluster's nodes", n)
	if err := e.Enroll(ctx, fg, n); err != nil {
		return fg, err
	}
	if err := fg.Stop(); err != nil {
		return fg, err
	}
	if err := sim.CopyDataDir(e.clusterSeed()+".tmp", e.DataDir()); err != nil {
		return fg, err
	}
	if err := os.Rename(e.clusterSeed()+".tmp", e.clusterSeed()); err != nil {
		return fg, err
	}
	return e.StartFleetgate(ctx)
}

type eachFunc func(reps int, names []string, scn string, f func(b *Broker, rep int) (Values, error))

// runCluster runs the cluster scenarios selected in cfg: fleetgate's
// cluster, NATS's cluster (when nats is a peer) and single-node fleetgate,
// in an order rotating by repetition. The single-node scenarios' peers are
// stopped first and each cluster when its scenarios are done: every
// broker measured has the machine to itself (but for the load generator).
func (e *Env) runCluster(ctx context.Context, cfg Config, lay clusterLayout, brokers map[string]*Broker, restart func(string) error, each eachFunc, fail func(scn, broker string, rep int, err error)) {
	has := func(s byte) bool { return strings.IndexByte(cfg.Scenarios, s) >= 0 }
	for _, p := range cfg.Peers {
		if b := brokers[p]; b != nil {
			b.Stop()
			delete(brokers, p)
		}
	}
	want := []string{FleetgateCluster}
	if slices.Contains(cfg.Peers, "nats") {
		want = append(want, NATSCluster)
	}
	var names []string // the clusters that started
	for _, name := range want {
		t0 := time.Now()
		if err := restart(name); err != nil {
			fail("cluster start", name, 0, err)
			continue
		}
		names = append(names, name)
		e.Logf("%s: %d nodes ready in %s (MQTT %s)", name, ClusterNodes, time.Since(t0).Round(time.Millisecond), nodeAddrs(brokers[name]))
	}
	defer func() {
		for _, name := range names {
			if b := brokers[name]; b != nil {
				b.Stop()
				delete(brokers, name)
			}
		}
	}()
	all := append(slices.Clone(names), "fleetgate")
	// keep records a run's figures even when it also failed (connects
	// refused, devices not back): the error goes to the results' errors,
	// the figures (failed, devices back) into the table.
	keep := func(scn string, f func(b *Broker, rep int) (Values, error)) func(b *Broker, rep int) (Values, error) {
		return func(b *Broker, rep int) (Values, error) {
			v, err := f(b, rep)
			if err != nil && v != nil {
				fail(scn, b.Name, rep, err)
				return v, nil
			}
			return v, err
		}
	}
	// withRSS adds the resident memory of the broker's processes (summed
	// over nodes) after the run.
	withRSS := func(scn string, f func(b *Broker, rep int) (Values, error)) func(b *Broker, rep int) (Values, error) {
		return keep(scn, func(b *Broker, rep int) (Values, error) {
			v, err := f(b, rep)
			if v != nil {
				if n, err := rss(b.PIDs()); err == nil {
					v["RSS MB (all processes)"] = float64(n) / (1 << 20)
				}
			}
			return v, err
		})
	}
	if has('a') {
		e.Logf("%s: %d workers (worker w on node w mod 3), %s per run", SA, cfg.ConnectWorkers, cfg.ClusterFor)
		each(cfg.ClusterReps, all, SA, withRSS(SA, func(b *Broker, _ int) (Values, error) {
			return e.Connects(ctx, b, cfg.ConnectWorkers, cfg.ClusterFor, false)
		}))
	}
	if has('b') {
		e.Logf("%s: %d publishers on nodes 1 and 2, the subscriber on node 3, %s per run", SB, cfg.Publishers, cfg.ClusterFor)
		each(cfg.ClusterReps, all, SB, withRSS(SB, func(b *Broker, _ int) (Values, error) {
			return e.FanIn(ctx, b, cfg.Publishers, 0, cfg.ClusterFor, 0, 0)
		}))
	}
	if has('c') {
		e.Logf("%s: %d publishers (window %d) on nodes 1 and 2, the subscriber on node 3, %s per run", SC, cfg.Publishers, cfg.QoS1Window, cfg.ClusterFor)
		each(cfg.ClusterReps, all, SC, withRSS(SC, func(b *Broker, _ int) (Values, error) {
			return e.FanIn(ctx, b, cfg.Publishers, 1, cfg.ClusterFor, cfg.QoS1Window, 0)
		}))
	}
	if has('d') {
		e.Logf("%s: %.0f msgs/s from %d publishers on nodes 1 and 2, the subscriber on node 3, %s per run", SD, cfg.ClusterRate, cfg.Publishers, cfg.ClusterFor)
		each(cfg.ClusterReps, all, SD, withRSS(SD, func(b *Broker, _ int) (Values, error) {
			return e.FanIn(ctx, b, cfg.Publishers, 1, cfg.ClusterFor, cfg.QoS1Window, cfg.ClusterRate)
		}))
	}
	if has('e') {
		e.Logf("%s: %d devices on node 2 revoked one by one through node 1's API", SE, cfg.ClusterRevoke)
		each(cfg.ClusterReps, []string{FleetgateCluster, "fleetgate"}, SE, keep(SE, func(b *Broker, rep int) (Values, error) {
			lo, hi := lay.revokeRange(b.Name, rep, cfg.ClusterRevoke)
			return e.Revoke(ctx, b, e.Devices[lo:hi])
		}))
	}
	if has('f') {
		e.Logf("%s: %d devices on node 3 publishing QoS 1 (%.0f msgs/s each), the subscriber on node 1; node 3 SIGKILLed, then restarted", SF, cfg.FailoverDevices, cfg.FailoverRate)
		each(cfg.ClusterReps, names, SF, keep(SF, func(b *Broker, _ int) (Values, error) {
			return e.Failover(ctx, b, cfg.FailoverDevices, cfg.FailoverRate, 2*time.Second)
		}))
	}
}

func nodeAddrs(b *Broker) string {
	if b == nil {
		return ""
	}
	var s []string
	for _, n := range b.Nodes {
		s = append(s, n.MQTT)
	}
	return strings.Join(s, ", ")
}
