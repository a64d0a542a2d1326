// Package bench is fleetgate's benchmark harness: it starts fleetgate and
// Mosquitto on loopback with certificates from the same CA, runs the same
// scenarios against each (issue 7), measures each broker process's own CPU
// time and RSS from /proc, and reports medians, spreads and ratios.
package bench

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Config sizes a run.
type Config struct {
	Reps           int           `json:"reps"`
	ConnectWorkers int           `json:"connect_workers"`
	ConnectFor     time.Duration `json:"connect_for"`
	Publishers     int           `json:"publishers"`
	FanInFor       time.Duration `json:"fanin_for"`
	QoS1Window     int           `json:"qos1_window"`
	IdleConns      int           `json:"idle_conns"`
	IdleWorkers    int           `json:"idle_workers"`
	RevokePerRep   int           `json:"revoke_per_rep"`
	Enrollments    int           `json:"enrollments_per_rep"`
	EnrollWorkers  int           `json:"enroll_workers"`
	TPMDevices     int           `json:"tpm_devices"`
	TPMRounds      int           `json:"tpm_rounds"`
	Scenarios      string        `json:"scenarios"` // e.g. "1234567abcdef"
	// The cluster scenarios (letters a-f, cluster.go).
	ClusterReps     int           `json:"cluster_reps"`
	ClusterFor      time.Duration `json:"cluster_for"`      // each run of a, b, c, d
	ClusterRate     float64       `json:"cluster_rate"`     // d: QoS 1 msgs/s in all
	ClusterRevoke   int           `json:"cluster_revoke"`   // e: devices revoked per run
	FailoverDevices int           `json:"failover_devices"` // f: devices on the killed node
	FailoverRate    float64       `json:"failover_rate"`    // f: QoS 1 msgs/s per device
	// Peers are the brokers run beside fleetgate: "mosquitto", "nats"
	// (NATS's MQTT listener); the QoS 1 scenario adds "mosquitto-q100000"
	// when mosquitto is a peer.
	Peers []string `json:"peers"`
}

// DefaultConfig fits `make bench` into about ten minutes on two cores.
func DefaultConfig() Config {
	return Config{Reps: 3, ConnectWorkers: 96, ConnectFor: 5 * time.Second, Publishers: 200, FanInFor: 5 * time.Second,
		QoS1Window: 16, IdleConns: 10000, IdleWorkers: 64, RevokePerRep: 100, Enrollments: 300, EnrollWorkers: 16,
		TPMDevices: 4, TPMRounds: 50, Scenarios: "1234567" + ClusterScenarios, Peers: []string{"mosquitto", "nats"},
		ClusterReps: 2, ClusterFor: 3 * time.Second, ClusterRate: 10000, ClusterRevoke: 50, FailoverDevices: 150, FailoverRate: 5}
}

// Scenario names, as in the table.
const (
	S1  = "1 full handshake"
	S2  = "2 resumed handshake"
	S3  = "3 QoS 0 fan-in"
	S4  = "4 QoS 1 fan-in"
	S5  = "5 idle connections"
	S6  = "6 revoke → closed"
	S7  = "7 enrollment (token)"
	S7T = "7 enrollment (TPM)"
	// the cluster scenarios
	SA = "a cluster: full handshake"
	SB = "b cluster: QoS 0 fan-in"
	SC = "c cluster: QoS 1 fan-in"
	SD = "d cluster: QoS 1 paced"
	SE = "e cluster: revoke → closed"
	SF = "f cluster: node SIGKILLed"
)

// ClusterScenarios are the letters of the cluster scenarios (make
// bench-cluster runs only them).
const ClusterScenarios = "abcdef"

// isCluster says whether a scenario is a cluster scenario.
func isCluster(scenario string) bool {
	return scenario != "" && strings.IndexByte(ClusterScenarios, scenario[0]) >= 0
}

// Run runs every scenario of cfg against fleetgate and each peer, rotating
// which broker goes first in each repetition, and returns the results.
// Every process it starts is stopped before it returns.
func Run(ctx context.Context, e *Env, cfg Config) (*Results, error) {
	procs = &Procs{}
	defer procs.StopAll()
	host, _ := os.Hostname()
	res := &Results{Started: time.Now(), Config: map[string]any{"bench": cfg, "fleetgate_flags": FleetgateServeFlags},
		Machine: map[string]string{"host": host, "cpus": fmt.Sprint(runtime.NumCPU()), "go": runtime.Version(), "os": runtime.GOOS + "/" + runtime.GOARCH}}
	if v, err := os.ReadFile("/proc/version"); err == nil {
		res.Machine["kernel"] = strings.TrimSpace(string(v))
	}
	has := func(s byte) bool { return strings.IndexByte(cfg.Scenarios, s) >= 0 }

	e.Logf("setup: PKI and device identities (token enrollment, reused for every broker)")
	if err := e.Init(ctx); err != nil {
		return res, err
	}
	if has('7') && cfg.TPMDevices > 0 {
		if _, err := e.PrepareTPM(); err != nil {
			return res, err
		}
	}
	fg, err := e.StartFleetgate(ctx)
	if err != nil {
		return res, err
	}
	nDev := max(cfg.ConnectWorkers, cfg.Publishers)
	if has('5') || has('6') {
		nDev = max(nDev, cfg.IdleConns+cfg.Reps*cfg.RevokePerRep)
	}
	clusterRun := strings.ContainsAny(cfg.Scenarios, ClusterScenarios)
	var lay clusterLayout
	if clusterRun {
		lay = newClusterLayout(cfg, nDev)
		nDev = lay.total
		if fg, err = e.seedCluster(ctx, fg, lay.seed); err != nil {
			return res, err
		}
	}
	if err := e.Enroll(ctx, fg, nDev); err != nil {
		return res, err
	}
	start := func(name string) (*Broker, error) {
		switch name {
		case "fleetgate":
			return e.StartFleetgate(ctx)
		case "mosquitto":
			return e.StartMosquitto(ctx, name, MosquittoDefaultQueue)
		case "mosquitto-q100000":
			return e.StartMosquitto(ctx, name, MosquittoRaisedQueue)
		case "nats":
			return e.StartNATS(ctx)
		case FleetgateCluster:
			return e.StartFleetgateCluster(ctx)
		case NATSCluster:
			return e.StartNATSCluster(ctx)
		}
		return nil, fmt.Errorf("unknown peer %q (mosquitto, nats)", name)
	}
	brokers := map[string]*Broker{"fleetgate": fg}
	names := []string{"fleetgate"}
	// the peers run the single-node scenarios (runCluster starts the clusters)
	peers := cfg.Peers
	if !strings.ContainsAny(cfg.Scenarios, "1234567") {
		peers = nil
	}
	for _, p := range peers {
		b, err := start(p)
		if err != nil {
			return res, err
		}
		brokers[p] = b
		names = append(names, p)
	}
	restart := func(name string) error {
		if b := brokers[name]; b != nil {
			b.Stop()
		}
		b, err := start(name)
		if err != nil {
			return err
		}
		brokers[name] = b
		return nil
	}
	// order rotates the brokers by repetition, so none always goes first
	// (or last, on a machine warming up or filling its page cache).
	order := func(rep int, names []string) []string {
		k := rep % len(names)
		return append(append([]string{}, names[k:]...), names[:k]...)
	}
	fail := func(scn, broker string, rep int, err error) {
		msg := fmt.Sprintf("%s, %s, repetition %d: %v", scn, broker, rep+1, err)
		e.Logf("  ERROR %s", msg)
		res.Errors = append(res.Errors, msg)
	}
	eachOfN := func(reps int, names []string, scn string, f func(b *Broker, rep int) (Values, error)) {
		for rep := range reps {
			for _, name := range order(rep, names) {
				if ctx.Err() != nil {
					return
				}
				b := brokers[name]
				if b == nil || b.Exited() {
					fail(scn, name, rep, fmt.Errorf("broker exited (see its log in %s); restarting it", e.Work))
					if err := restart(name); err != nil {
						fail(scn, name, rep, err)
						continue
					}
					b = brokers[name]
				}
				v, err := f(b, rep)
				if err != nil {
					fail(scn, name, rep, err)
					continue
				}
				res.Add(scn, name, v)
				e.Logf("  %s #%d %-9s %s", scn, rep+1, name, brief(v))
				time.Sleep(500 * time.Millisecond)
			}
		}
	}
	eachOf := func(names []string, scn string, f func(b *Broker, rep int) (Values, error)) {
		eachOfN(cfg.Reps, names, scn, f)
	}
	each := func(scn string, f func(b *Broker, rep int) (Values, error)) { eachOf(names, scn, f) }

	if has('1') {
		e.Logf("%s: %d workers, %s per run", S1, cfg.ConnectWorkers, cfg.ConnectFor)
		each(S1, func(b *Broker, _ int) (Values, error) {
			return e.Connects(ctx, b, cfg.ConnectWorkers, cfg.ConnectFor, false)
		})
	}
	if has('2') {
		e.Logf("%s: %d workers, %s per run", S2, cfg.ConnectWorkers, cfg.ConnectFor)
		each(S2, func(b *Broker, _ int) (Values, error) {
			return e.Connects(ctx, b, cfg.ConnectWorkers, cfg.ConnectFor, true)
		})
	}
	if has('3') {
		e.Logf("%s: %d publishers, 1 subscriber, %s per run", S3, cfg.Publishers, cfg.FanInFor)
		each(S3, func(b *Broker, _ int) (Values, error) { return e.FanIn(ctx, b, cfg.Publishers, 0, cfg.FanInFor, 0, 0) })
	}
	if has('4') {
		e.Logf("%s: %d publishers (window %d), 1 subscriber, %s per run", S4, cfg.Publishers, cfg.QoS1Window, cfg.FanInFor)
		// mosquitto's default queue (1000) drops QoS 1 messages for a busy
		// subscriber; a user who cannot lose them raises it: both are shown.
		s4 := names
		if brokers["mosquitto"] != nil {
			if err := restart("mosquitto-q100000"); err != nil {
				fail(S4, "mosquitto-q100000", 0, err)
			} else {
				s4 = append(slices.Clone(names), "mosquitto-q100000")
			}
		}
		eachOf(s4, S4, func(b *Broker, _ int) (Values, error) {
			return e.FanIn(ctx, b, cfg.Publishers, 1, cfg.FanInFor, cfg.QoS1Window, 0)
		})
		if b := brokers["mosquitto-q100000"]; b != nil {
			b.Stop()
			delete(brokers, "mosquitto-q100000")
		}
	}
	if has('5') || has('6') {
		e.Logf("%s: %d connections (each broker restarted before each run: fresh RSS baseline)", S5, cfg.IdleConns)
		if has('6') {
			e.Logf("%s: with them connected, %d more devices connected, revoked one by one (fleetgate only)", S6, cfg.RevokePerRep)
		}
		each(S5, func(b *Broker, rep int) (Values, error) {
			if err := restart(b.Name); err != nil {
				return nil, err
			}
			b = brokers[b.Name]
			var then func() (Values, error)
			if has('6') && b.Name == "fleetgate" {
				then = func() (Values, error) {
					lo := cfg.IdleConns + rep*cfg.RevokePerRep
					v, err := e.Revoke(ctx, b, e.Devices[lo:lo+cfg.RevokePerRep])
					if err != nil {
						fail(S6, b.Name, rep, err)
						return nil, nil
					}
					res.Add(S6, b.Name, v)
					e.Logf("  %s #%d %-9s %s", S6, rep+1, b.Name, brief(v))
					return nil, nil
				}
			}
			return e.Idle(ctx, b, cfg.IdleConns, cfg.IdleWorkers, then)
		})
	}
	if has('7') {
		e.Logf("%s: %d enrollments per run, %d concurrent HTTPS clients (fleetgate only)", S7, cfg.Enrollments, cfg.EnrollWorkers)
		for rep := range cfg.Reps {
			if ctx.Err() != nil {
				break
			}
			v, err := e.EnrollTokens(ctx, brokers["fleetgate"], rep, cfg.Enrollments, cfg.EnrollWorkers)
			if err != nil {
				fail(S7, "fleetgate", rep, err)
				continue
			}
			res.Add(S7, "fleetgate", v)
			e.Logf("  %s #%d fleetgate %s", S7, rep+1, brief(v))
		}
		if cfg.TPMDevices > 0 {
			if err := e.EnrollTPMScenario(ctx, res, cfg, brokers); err != nil {
				fail(S7T, "fleetgate", 0, err)
			}
		}
	}
	if clusterRun && ctx.Err() == nil {
		e.runCluster(ctx, cfg, lay, brokers, restart, eachOfN, fail)
	}
	slices.SortStableFunc(res.Metrics, func(a, b *Metric) int { return strings.Compare(a.Scenario[:1], b.Scenario[:1]) })
	res.Duration = time.Since(res.Started).Round(time.Second).String()
	return res, ctx.Err()
}

func brief(v Values) string {
	keys := make([]string, 0, len(v))
	for k := range v {
		keys = append(keys, k)
	}
	sortByOrder(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%s  ", k, fmtNum(v[k]))
	}
	return b.String()
}

func sortByOrder(keys []string) {
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && (metricOrder(keys[j]) < metricOrder(keys[j-1]) || metricOrder(keys[j]) == metricOrder(keys[j-1]) && keys[j] < keys[j-1]); j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
}
