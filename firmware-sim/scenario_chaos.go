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
	chaosKill      = "kill"      // SIGKILL a node, restart it after Hold
	chaosPause     = "pause"     // SIGSTOP a node, SIGCONT after Hold
	chaosPartition = "partition" // cut a node's NATS routes, heal after Hold
	chaosAllDown   = "all-down"  // SIGKILL every node at once, restart after Hold
	chaosRevoke    = "revoke"    // revoke a device through a node's API
	chaosSuspend   = "suspend"   // suspend a device through a node, resume through the next after Hold
	chaosToken     = "token"     // a new device's token redeemed at once through Node and the next node
)

// allDownEvery: at most one all-down event per this much of the schedule.
const allDownEvery = 2 * time.Minute

// ChaosEvent is one step of a schedule.
type ChaosEvent struct {
	At     time.Duration `json:"at_ns"`
	Action string        `json:"action"`
	Node   int           `json:"node"`             // index (revoke: the API used)
	Hold   time.Duration `json:"hold_ns"`          // kill: down for; pause: stopped for
	Device int           `json:"device,omitempty"` // revoke, suspend: index in the fleet; token: its number
}

func (e ChaosEvent) String() string {
	switch e.Action {
	case chaosRevoke:
		return fmt.Sprintf("t+%5.1fs revoke device #%d through node%d", e.At.Seconds(), e.Device+1, e.Node+1)
	case chaosSuspend:
		return fmt.Sprintf("t+%5.1fs suspend device #%d through node%d for %.1fs", e.At.Seconds(), e.Device+1, e.Node+1, e.Hold.Seconds())
	case chaosToken:
		return fmt.Sprintf("t+%5.1fs token #%d redeemed through node%d and the next", e.At.Seconds(), e.Device+1, e.Node+1)
	case chaosAllDown:
		return fmt.Sprintf("t+%5.1fs all-down every node for %.1fs", e.At.Seconds(), e.Hold.Seconds())
	default:
		return fmt.Sprintf("t+%5.1fs %-6s node%d for %.1fs", e.At.Seconds(), e.Action, e.Node+1, e.Hold.Seconds())
	}
}

// chaosSchedule is the schedule of seed for a cluster of nodes and a fleet
// of devices over d. One node is faulty at a time (the others keep a
// JetStream quorum), except all-down (every node at once, at most once per
// allDownEvery); revocations and suspensions (each at most a tenth of the
// fleet, different devices) and token redemptions come in between,
// through any node.
func chaosSchedule(seed int64, d time.Duration, nodes, devices int) []ChaosEvent {
	rng := rand.New(rand.NewPCG(uint64(seed), 0x5eed))
	span := func(lo, hi float64) time.Duration {
		return time.Duration((lo + rng.Float64()*(hi-lo)) * float64(time.Second))
	}
	var out []ChaosEvent
	perm := rng.Perm(devices)
	revocable := perm[:devices/10]
	suspendable := perm[devices/10 : 2*(devices/10)]
	tokens := 0
	var busyUntil time.Duration
	lastAllDown := -allDownEvery
	for t := span(1, 3); t < d; t += span(1.5, 4) {
		switch k := rng.IntN(20); {
		case k == 0 && t >= busyUntil && t-lastAllDown >= allDownEvery:
			e := ChaosEvent{At: t, Action: chaosAllDown, Hold: span(1, 5)}
			busyUntil, lastAllDown = t+e.Hold+time.Second, t
			out = append(out, e)
		case k < 13 && t >= busyUntil:
			e := ChaosEvent{At: t, Node: rng.IntN(nodes)}
			switch {
			case k < 6:
				e.Action, e.Hold = chaosKill, span(1, 6)
			case k < 10:
				e.Action, e.Hold = chaosPause, span(0.3, 3)
			default:
				e.Action, e.Hold = chaosPartition, span(2, 12)
			}
			busyUntil = t + e.Hold + time.Second
			out = append(out, e)
		case k < 16 && len(revocable) > 0:
			out = append(out, ChaosEvent{At: t, Action: chaosRevoke, Node: rng.IntN(nodes), Device: revocable[0]})
			revocable = revocable[1:]
		case k < 18 && len(suspendable) > 0:
			out = append(out, ChaosEvent{At: t, Action: chaosSuspend, Node: rng.IntN(nodes), Device: suspendable[0], Hold: span(2, 6)})
			suspendable = suspendable[1:]
		case k >= 18:
			out = append(out, ChaosEvent{At: t, Action: chaosToken, Node: rng.IntN(nodes), Device: tokens})
			tokens++
		}
	}
	return out
}

// ChaosStat is what the chaos scenario did and found.
type ChaosStat struct {
	Seed       int64         `json:"seed"`
	Nodes      int           `json:"nodes"`
	Duration   time.Duration `json:"duration_ns"`
	Schedule   []ChaosEvent  `json:"schedule"`
	Kills      int           `json:"kills"`
	Pauses     int           `json:"pauses"`
	Partitions int           `json:"partitions"`
	AllDowns   int           `json:"all_downs"`
	Revoked    int           `json:"revoked"`
	// Suspended: devices suspended and resumed; SuspendedIn: fresh
	// connections a node accepted while the device was suspended;
	// ResumeFailed: suspensions not resumed (the device stays out).
	Suspended    int `json:"suspended"`
	SuspendedIn  int `json:"suspended_accepted"`
	ResumeFailed int `json:"resume_failed"`
	// Tokens redeemed through two nodes at once; TwoCerts: tokens that
	// produced more than one certificate (from the answers, or a registry
	// serial that is not the one answer's).
	Tokens   []*TokenStat `json:"tokens,omitempty"`
	TwoCerts []string     `json:"tokens_two_certificates,omitempty"`
	// LostBeforeAllDown: acknowledged messages lost that were acknowledged
	// before the last all-down (every node killed at once).
	LostBeforeAllDown int `json:"lost_acked_before_all_down"`
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
	// acknowledged messages missing, "device/seq acked at t+…" (1000 at
	// most, taken evenly over all of them in order of device and
	// sequence), to lay beside the log; LostByDevice and LostBy10s count
	// every one, by device and by when it was acknowledged (t+, 10 s bins).
	Log          []string       `json:"log"`
	Lost         []string       `json:"lost,omitempty"`
	LostByDevice map[string]int `json:"lost_by_device,omitempty"`
	LostBy10s    map[int]int    `json:"lost_by_10s,omitempty"`
}

func (st *ChaosStat) write(w io.Writer) {
	certs := 0
	for _, ts := range st.Tokens {
		certs += ts.Certs
	}
	fmt.Fprintf(w, "  chaos              seed %d, %s: %d kills, %d pauses, %d partitions, %d all-down, %d revocations, %d suspensions, %d tokens\n",
		st.Seed, st.Duration, st.Kills, st.Pauses, st.Partitions, st.AllDowns, st.Revoked, st.Suspended, len(st.Tokens))
	fmt.Fprintf(w, "                     tokens: %d certificates from %d tokens redeemed twice at once, %d with two; suspended: %d accepted while suspended, %d not resumed; lost of those acked before an all-down: %d\n",
		certs, len(st.Tokens), len(st.TwoCerts), st.SuspendedIn, st.ResumeFailed, st.LostBeforeAllDown)
	fmt.Fprintf(w, "                     QoS 1: %d acknowledged, %d lost; revoked: %d messages after the revoke delivered, %d back in\n", st.Acked, st.AckedLost, st.RevokedLeaks, st.RevokedBack)
	fmt.Fprintf(w, "                     live on two nodes: %d client IDs over %d samples (%d single-sample overlaps); %d/%d devices back at the end\n",
		len(st.DoubleLive), st.Samples, st.DoubleOnce, st.Back, st.Expected)
	if len(st.Lost) > 0 {
		fmt.Fprintf(w, "                     lost (%d; a sample): %s\n", st.AckedLost, strings.Join(st.Lost[:min(5, len(st.Lost))], "; "))
		fmt.Fprintf(w, "                     lost by device: %v\n", st.LostByDevice)
		fmt.Fprintf(w, "                     lost by t+ (10 s bins, when acknowledged): %v\n", st.LostBy10s)
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
	var allDownAt time.Time // the last all-down
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
		case chaosAllDown:
			if err := r.cl.waitReady(ctx, 60*time.Second); err != nil {
				r.progress("%s: skipped, the cluster is not ready: %v", e, err)
				continue
			}
			allDownAt = time.Now()
			st.AllDowns++
			r.progress("%s: every node killed", e)
			if err := r.allDown(ctx, e.Hold, logf); err != nil {
				return err
			}
		case chaosPartition:
			if err := r.cl.waitReady(ctx, 60*time.Second); err != nil {
				r.progress("%s: skipped, the cluster is not ready: %v", e, err)
				continue
			}
			r.cl.mesh.Cut(e.Node)
			st.Partitions++
			logf("node%d cut off (its NATS routes)", e.Node+1)
			time.Sleep(e.Hold)
			r.cl.mesh.Heal(e.Node)
			logf("node%d healed", e.Node+1)
			r.progress("%s: cut off and healed", e)
		case chaosSuspend:
			d := r.devs[e.Device]
			if d == nil {
				continue
			}
			holds.Add(1)
			go func() {
				defer holds.Done()
				accepted, err := r.suspendAndResume(ctx, e.Node, d, e.Hold, logf)
				sampler.mu.Lock()
				st.Suspended++
				if accepted {
					st.SuspendedIn++
				}
				if err != nil {
					st.ResumeFailed++
				}
				sampler.mu.Unlock()
				if err != nil {
					r.progress("%s: %v", e, err)
				}
			}()
		case chaosToken:
			holds.Add(1)
			go func() {
				defer holds.Done()
				ts := r.redeemTwice(ctx, e.Node, e.Device)
				sampler.mu.Lock()
				st.Tokens = append(st.Tokens, ts)
				sampler.mu.Unlock()
				logf("token of %s: %d certificates, %d refused, %d errors", ts.Device, ts.Certs, ts.Refused, len(ts.Errors))
				r.progress("%s: %s: %d certificates, %d refused %v", e, ts.Device, ts.Certs, ts.Refused, ts.Errors)
			}()
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
				if _, err := r.actionThroughAny(ctx, e.Node, d.id, "revoke"); err != nil {
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
	st.Lost, st.LostByDevice, st.LostBy10s = r.lostReport(miss, start)
	r.rep.check("every acknowledged QoS 1 message reached the service", len(miss) == 0, "%d acknowledged, %d missing %v", st.Acked, len(miss), head(miss))
	if !allDownAt.IsZero() {
		for _, m := range miss {
			id, seqs, _ := strings.Cut(m, "/")
			var seq int64
			fmt.Sscan(seqs, &seq)
			if d := r.byID(id); d != nil {
				if at, ok := d.acked.Load(seq); ok && at.(time.Time).Before(allDownAt) {
					st.LostBeforeAllDown++
				}
			}
		}
		r.rep.check("nothing acknowledged before every node was killed at once was lost", st.LostBeforeAllDown == 0,
			"%d all-down events; %d messages acknowledged before the last one missing", st.AllDowns, st.LostBeforeAllDown)
	}
	if st.Suspended > 0 {
		r.rep.check("suspended devices refused while suspended, and back after the resume", st.SuspendedIn == 0 && st.ResumeFailed == 0,
			"%d suspensions: %d fresh connections accepted while suspended, %d not resumed", st.Suspended, st.SuspendedIn, st.ResumeFailed)
	}
	if len(st.Tokens) > 0 {
		certs, none := 0, 0
		for _, ts := range st.Tokens {
			certs += ts.Certs
			if ts.Certs > 0 {
				ts.Registry = r.registrySerial(ctx, ts.Device)
			}
			switch {
			case ts.Certs > 1:
				st.TwoCerts = append(st.TwoCerts, fmt.Sprintf("%s: %d certificates from the answers %v", ts.Device, ts.Certs, ts.Serial))
			case ts.Certs == 1 && ts.Registry != ts.Serial[0]:
				st.TwoCerts = append(st.TwoCerts, fmt.Sprintf("%s: answered %s, the registry lists %q", ts.Device, ts.Serial[0], ts.Registry))
			case ts.Certs == 0:
				none++
			}
		}
		r.rep.check("no token produced two certificates (two redemptions at once through two nodes)", len(st.TwoCerts) == 0,
			"%d tokens, %d certificates, %d tokens without one (faults), %v", len(st.Tokens), certs, none, head(st.TwoCerts))
	}
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

// lostReport lays out the missing messages ("device/seq"): at most 1000 of
// them with the time each was acknowledged, taken evenly over all in order
// of device and numeric sequence (a string sort put seq 1000 before 101,
// which drew windows of loss that were not there), and every one counted
// by device and by 10 s of its acknowledgement.
func (r *run) lostReport(miss []string, start time.Time) (sample []string, byDevice map[string]int, by10s map[int]int) {
	type lost struct {
		id  string
		seq int64
		at  time.Time
	}
	all := make([]lost, 0, len(miss))
	byDevice, by10s = map[string]int{}, map[int]int{}
	for _, m := range miss {
		id, seqs, _ := strings.Cut(m, "/")
		l := lost{id: id}
		fmt.Sscan(seqs, &l.seq)
		if d := r.byID(id); d != nil {
			if at, ok := d.acked.Load(l.seq); ok {
				l.at = at.(time.Time)
				by10s[int(l.at.Sub(start).Seconds())/10*10]++
			}
		}
		byDevice[id]++
		all = append(all, l)
	}
	sort.Slice(all, func(i, j int) bool {
		if all[i].id != all[j].id {
			return all[i].id < all[j].id
		}
		return all[i].seq < all[j].seq
	})
	step := max(1, (len(all)+999)/1000)
	for i := 0; i < len(all); i += step {
		m := fmt.Sprintf("%s/%d", all[i].id, all[i].seq)
		if !all[i].at.IsZero() {
			m += fmt.Sprintf(" acked at t+%.2fs", all[i].at.Sub(start).Seconds())
		}
		sample = append(sample, m)
	}
	return sample, byDevice, by10s
}
