package sim

// The chaos scenario: a random but reproducible schedule of faults (a
// seed gives the same schedule) while every device publishes numbered QoS
// 1 messages and operators revoke devices through any node; then a
// checker, from what the clients saw and what the nodes answered.

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
)

// Chaos actions.
const (
	chaosKill   = "kill"   // SIGKILL a node, restart it after Hold
	chaosPause  = "pause"  // SIGSTOP a node, SIGCONT after Hold
	chaosRevoke = "revoke" // revoke a device through a node's API
)

// ChaosEvent is one step of a schedule.
type ChaosEvent struct {
	At     time.Duration `json:"at_ns"`
	Action string        `json:"action"`
	Node   int           `json:"node"`             // index (revoke: the API used)
	Hold   time.Duration `json:"hold_ns"`          // kill: down for; pause: stopped for
	Device int           `json:"device,omitempty"` // revoke: index in the fleet
}

func (e ChaosEvent) String() string {
	switch e.Action {
	case chaosRevoke:
		return fmt.Sprintf("t+%5.1fs revoke device #%d through node%d", e.At.Seconds(), e.Device+1, e.Node+1)
	default:
		return fmt.Sprintf("t+%5.1fs %-6s node%d for %.1fs", e.At.Seconds(), e.Action, e.Node+1, e.Hold.Seconds())
	}
}

// chaosSchedule is the schedule of seed for a cluster of nodes and a fleet
// of devices over d. One node is faulty at a time (the others keep a
// JetStream quorum); revocations (at most a tenth of the fleet) come in
// between, through any node.
func chaosSchedule(seed int64, d time.Duration, nodes, devices int) []ChaosEvent {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x5eed))
	span := func(lo, hi float64) time.Duration {
		return time.Duration((lo + rng.Float64()*(hi-lo)) * float64(time.Second))
	}
	var out []ChaosEvent
	revocable := rng.Perm(devices)[:devices/10]
	var busyUntil time.Duration
	for t := span(1, 3); t < d; t += span(1.5, 4) {
		switch k := rng.IntN(10); {
		case k < 7 && t >= busyUntil:
			e := ChaosEvent{At: t, Node: rng.IntN(nodes)}
			if k < 4 {
				e.Action, e.Hold = chaosKill, span(1, 6)
			} else {
				e.Action, e.Hold = chaosPause, span(0.3, 3)
			}
			busyUntil = t + e.Hold + time.Second
			out = append(out, e)
		case len(revocable) > 0:
			out = append(out, ChaosEvent{At: t, Action: chaosRevoke, Node: rng.IntN(nodes), Device: revocable[0]})
			revocable = revocable[1:]
		}
	}
	return out
}

// ChaosStat is what the chaos scenario did and found.
type ChaosStat struct {
	Seed     int64         `json:"seed"`
	Nodes    int           `json:"nodes"`
	Duration time.Duration `json:"duration_ns"`
	Schedule []ChaosEvent  `json:"schedule"`
	Kills    int           `json:"kills"`
	Pauses   int           `json:"pauses"`
	Revoked  int           `json:"revoked"`
	// Acked QoS 1 messages of the devices not revoked, and how many the
	// service never received.
	Acked     int64 `json:"qos1_acknowledged"`
	AckedLost int   `json:"qos1_acknowledged_lost"`
	// RevokedLeaks counts messages a revoked device handed to Publish
	// after its revoke returned that the service received anyway;
	// RevokedBack, revoked devices that got back in.
	RevokedLeaks int `json:"revoked_leaks"`
	RevokedBack  int `json:"revoked_back_in"`
	// Samples of every node's online clients (admin API, twice a second);
	// DoubleLive lists client IDs seen online on two nodes in two
	// consecutive samples, DoubleOnce how often one sample alone showed it
	// (a move between two nodes' answers can show it once).
	Samples    int      `json:"samples"`
	DoubleLive []string `json:"double_live"`
	DoubleOnce int      `json:"double_once"`
	// Back: devices (not revoked) connected at the end, of Expected.
	Back     int `json:"devices_back"`
	Expected int `json:"devices_expected"`
	// Log: what happened when, relative to the start of the schedule: the
	// faults as executed and the backend service's connections; Lost: the
	// acknowledged messages missing, "device/seq acked at t+…" (the first
	// 1000), to lay beside the log.
	Log  []string `json:"log"`
	Lost []string `json:"lost,omitempty"`
}

func (st *ChaosStat) write(w io.Writer) {
	fmt.Fprintf(w, "  chaos              seed %d, %s: %d kills, %d pauses, %d revocations\n", st.Seed, st.Duration, st.Kills, st.Pauses, st.Revoked)
	fmt.Fprintf(w, "                     QoS 1: %d acknowledged, %d lost; revoked: %d messages after the revoke delivered, %d back in\n", st.Acked, st.AckedLost, st.RevokedLeaks, st.RevokedBack)
	fmt.Fprintf(w, "                     live on two nodes: %d client IDs over %d samples (%d single-sample overlaps); %d/%d devices back at the end\n",
		len(st.DoubleLive), st.Samples, st.DoubleOnce, st.Back, st.Expected)
	if len(st.Lost) > 0 {
		fmt.Fprintf(w, "                     lost (first of %d): %s\n", st.AckedLost, strings.Join(st.Lost[:min(5, len(st.Lost))], "; "))
		fmt.Fprintln(w, "                     what happened:")
		for _, l := range st.Log {
			fmt.Fprintf(w, "                       %s\n", l)
		}
	}
	fmt.Fprintf(w, "                     replay: fleetsim run --cluster %d --scenario chaos --seed %d --duration %s\n", st.Nodes, st.Seed, st.Duration)
}

// chaos runs the schedule of cfg.Seed over cfg.Duration, then checks.
func (r *run) chaos(ctx context.Context) error {
	live := r.live()
	sched := chaosSchedule(r.cfg.Seed, r.cfg.Duration, len(r.cl.nodes), len(r.devs))
	st := &ChaosStat{Seed: r.cfg.Seed, Nodes: len(r.cl.nodes), Duration: r.cfg.Duration, Schedule: sched}
	r.rep.Chaos = st
	r.progress("chaos: seed %d, %s, %d events:", r.cfg.Seed, r.cfg.Duration, len(sched))
	for _, e := range sched {
		r.progress("  %s", e)
	}
	stop := r.publishLoop(ctx, live, 200*time.Millisecond)
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	sampler := r.sampleOwners(ctx, st)

	revoked := map[string]bool{}
	seqAtReturn := map[string]int64{}
	var holds sync.WaitGroup
	start := time.Now()
	logf := func(f string, a ...any) {
		line := fmt.Sprintf("t+%6.2fs ", time.Since(start).Seconds()) + fmt.Sprintf(f, a...)
		sampler.mu.Lock()
		st.Log = append(st.Log, line)
		sampler.mu.Unlock()
	}
	onBackend := func(ev string) { logf("backend %s", ev) }
	r.onBackend.Store(&onBackend)
	defer r.onBackend.Store(nil)
	for _, e := range sched {
		if !sleepUntil(ctx, start.Add(e.At)) {
			break
		}
		nd := r.cl.nodes[e.Node]
		switch e.Action {
		case chaosKill, chaosPause:
			// One node out at a time: the one before must be back.
			if err := r.cl.waitReady(ctx, 60*time.Second); err != nil {
				r.progress("%s: skipped, the cluster is not ready: %v", e, err)
				continue
			}
			if e.Action == chaosKill {
				pid := nd.pid()
				if err := nd.kill(); err != nil {
					return err
				}
				st.Kills++
				logf("node%d killed (pid %d)", e.Node+1, pid)
				r.progress("%s (pid %d): killed", e, pid)
				time.Sleep(e.Hold)
				if err := r.cl.start(ctx, nd); err != nil {
					return fmt.Errorf("restart %s: %w", nd.name, err)
				}
				logf("node%d restarted (pid %d)", e.Node+1, nd.pid())
				r.progress("  node%d restarted (pid %d)", e.Node+1, nd.pid())
			} else {
				if err := nd.pause(true); err != nil {
					return err
				}
				st.Pauses++
				logf("node%d stopped (SIGSTOP)", e.Node+1)
				time.Sleep(e.Hold)
				if err := nd.pause(false); err != nil {
					return err
				}
				logf("node%d continued (SIGCONT)", e.Node+1)
				r.progress("%s (pid %d): stopped and continued", e, nd.pid())
			}
		case chaosRevoke:
			d := r.devs[e.Device]
			if d == nil {
				continue
			}
			holds.Add(1)
			go func() { // operators do not wait for the faults
				defer holds.Done()
				if err := r.revokeThroughAny(ctx, e.Node, d); err != nil {
					r.progress("%s: %v", e, err)
					return
				}
				sampler.mu.Lock()
				revoked[d.id] = true
				seqAtReturn[d.id] = d.seq.Load()
				sampler.mu.Unlock()
				logf("%s revoked", d.id)
				r.progress("%s: %s revoked", e, d.id)
			}()
		}
	}
	holds.Wait()

	// The end: every node up, every device not revoked back, the traffic
	// delivered.
	for _, nd := range r.cl.nodes {
		if nd.isPaused() {
			_ = nd.pause(false)
		}
		if nd.running() == nil {
			if err := r.cl.start(ctx, nd); err != nil {
				return fmt.Errorf("restart %s: %w", nd.name, err)
			}
		}
	}
	if err := r.cl.waitReady(ctx, 90*time.Second); err != nil {
		r.rep.check("every node ready again after the chaos", false, "%v", err)
	}
	sampler.mu.Lock()
	st.Revoked = len(revoked)
	sampler.mu.Unlock()
	expected := 0
	connected := func() int {
		n := 0
		for _, d := range live {
			if !revoked[d.id] && d.client().IsConnected() {
				n++
			}
		}
		return n
	}
	for _, d := range live {
		if !revoked[d.id] {
			expected++
		}
	}
	waitFor(ctx, 90*time.Second, func() bool { return connected() == expected })
	st.Back, st.Expected = connected(), expected
	time.Sleep(time.Second)
	stop()
	stopped = true
	sampler.stop()
	r.waitDelivered(ctx, 30*time.Second)

	r.rep.check("every device not revoked is connected at the end", st.Back == expected, "%d/%d", st.Back, expected)
	miss := r.missing(revoked)
	for _, d := range live {
		if !revoked[d.id] {
			d.acked.Range(func(_, _ any) bool { st.Acked++; return true })
		}
	}
	st.AckedLost = len(miss)
	sort.Strings(miss)
	for _, m := range miss[:min(len(miss), 1000)] {
		id, seqs, _ := strings.Cut(m, "/")
		var seq int64
		fmt.Sscan(seqs, &seq)
		if d := r.byID(id); d != nil {
			if at, ok := d.acked.Load(seq); ok {
				m += fmt.Sprintf(" acked at t+%.2fs", at.(time.Time).Sub(start).Seconds())
			}
		}
		st.Lost = append(st.Lost, m)
	}
	r.rep.check("every acknowledged QoS 1 message reached the service", len(miss) == 0, "%d acknowledged, %d missing %v", st.Acked, len(miss), head(miss))
	var leaks []string
	for id := range revoked {
		d := r.byID(id)
		for s := seqAtReturn[id] + 1; s <= d.seq.Load(); s++ {
			if r.recv.has(id, s) {
				st.RevokedLeaks++
				leaks = append(leaks, fmt.Sprintf("%s/%d", id, s))
			}
		}
		if d.client().IsConnected() || r.acceptedAnywhere(ctx, d) != "" {
			st.RevokedBack++
		}
	}
	r.rep.check("nothing a revoked device sent after its revoke returned was delivered", st.RevokedLeaks == 0, "%d delivered %v", st.RevokedLeaks, head(leaks))
	r.rep.check("revoked devices stay out on every node", st.RevokedBack == 0, "%d of %d got back in", st.RevokedBack, len(revoked))
	sort.Strings(st.DoubleLive)
	r.rep.check("no client ID live on two nodes at once (two consecutive samples)", len(st.DoubleLive) == 0,
		"%d over %d samples: %v (single-sample overlaps: %d)", len(st.DoubleLive), st.Samples, head(st.DoubleLive), st.DoubleOnce)
	return nil
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	select {
	case <-time.After(time.Until(t)):
		return true
	case <-ctx.Done():
		return false
	}
}

func (r *run) byID(id string) *device {
	for _, d := range r.live() {
		if d.id == id {
			return d
		}
	}
	return nil
}

// revokeThroughAny revokes d through node i's API, or the next node's if
// that one does not answer (it may be down: operators retry elsewhere).
func (r *run) revokeThroughAny(ctx context.Context, i int, d *device) error {
	var errs []string
	deadline := time.Now().Add(60 * time.Second)
	for k := 0; time.Now().Before(deadline) && ctx.Err() == nil; k++ {
		j := (i + k) % len(r.cl.nodes)
		if r.cl.nodes[j].running() == nil || r.cl.nodes[j].isPaused() {
			continue
		}
		admin, err := r.adminOf(j)
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err = admin.DeviceAction(cctx, d.id, "revoke", "fleetsim chaos scenario")
			cancel()
			if err == nil {
				return nil
			}
		}
		errs = append(errs, fmt.Sprintf("node%d: %v", j+1, err))
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("revoke %s: %s", d.id, strings.Join(head(errs), "; "))
}

// acceptedAnywhere tries a fresh connection of d to each node and returns
// the first node that accepted it ("" if none).
func (r *run) acceptedAnywhere(ctx context.Context, d *device) string {
	for _, nd := range r.cl.nodes {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err := d.dev.Connect(cctx, devicesdk.ConnectOptions{BrokerAddr: nd.addrs.MQTT, ServerName: r.cfg.ServerName})
		cancel()
		if err == nil {
			c.Close()
			return nd.name
		}
	}
	return ""
}

// ownerSampler asks every running node for its online devices twice a
// second.
type ownerSampler struct {
	mu   sync.Mutex // also guards the chaos loop's revoked maps
	stop func()
}

func (r *run) sampleOwners(ctx context.Context, st *ChaosStat) *ownerSampler {
	s := &ownerSampler{}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		prev := map[string]bool{}
		double := map[string]bool{}
		for {
			select {
			case <-done:
				s.mu.Lock()
				for id := range double {
					st.DoubleLive = append(st.DoubleLive, id)
				}
				s.mu.Unlock()
				return
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
			on := map[string][]string{}
			var mu sync.Mutex
			var qwg sync.WaitGroup
			for i, nd := range r.cl.nodes {
				if nd.running() == nil || nd.isPaused() {
					continue
				}
				qwg.Add(1)
				go func() {
					defer qwg.Done()
					admin, err := r.adminOf(i)
					if err != nil {
						return
					}
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					defer cancel()
					cs, err := admin.Clients(cctx, url.Values{"online": {"true"}, "role": {"device"}, "limit": {fmt.Sprint(api.MaxListLimit)}})
					if err != nil {
						return
					}
					mu.Lock()
					for _, c := range cs {
						on[c.ClientID] = append(on[c.ClientID], nd.name)
					}
					mu.Unlock()
				}()
			}
			qwg.Wait()
			now := map[string]bool{}
			for id, nodes := range on {
				if len(nodes) > 1 {
					now[id] = true
					st.DoubleOnce++
					if prev[id] {
						double[id+"@"+strings.Join(nodes, "+")] = true
					}
				}
			}
			st.Samples++
			prev = now
		}
	}()
	s.stop = func() {
		close(done)
		wg.Wait()
	}
	return s
}
