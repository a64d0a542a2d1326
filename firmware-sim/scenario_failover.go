package sim

import (
	"context"
	"fmt"
	"io"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
)

// FailoverStat is what the failover scenario measured, from what the
// clients saw.
type FailoverStat struct {
	Killed          string `json:"killed_node"`
	KilledPID       int    `json:"killed_pid"`
	DevicesOnKilled int    `json:"devices_on_killed_node"`
	// Back counts the devices of the killed node connected again (to
	// another node); BackAfter is the time from the SIGKILL until the last
	// of them was back, BackP50 the median.
	Back      int           `json:"devices_back"`
	BackAfter time.Duration `json:"back_after_ns"`
	BackP50   time.Duration `json:"back_p50_ns"`
	// MovedTo counts where they went, by node name.
	MovedTo map[string]int `json:"moved_to"`
	// Commands the service published while the devices were away and got
	// a PUBACK for, and how many the devices received once back (the
	// persistent session resumed on another node with its queued message);
	// CommandsAnswered: a command published after the move received (the
	// session's subscription resumed).
	CommandsSent     int `json:"commands_acked_while_away"`
	AwayAnswered     int `json:"commands_while_away_received"`
	CommandsAnswered int `json:"commands_after_move_received"`
	// QoS 1 telemetry: acknowledged to the devices (all but the revoked)
	// during the whole run, and how many of those the service never
	// received.
	Acked     int64 `json:"qos1_acknowledged"`
	AckedLost int   `json:"qos1_acknowledged_lost"`
	// Revoked devices (before the kill, through node 2's API) and how many
	// of them got back in.
	Revoked     int `json:"revoked"`
	RevokedBack int `json:"revoked_back_in"`
}

// failover: every device publishes QoS 1; a few are revoked through node
// 2; then the last node is SIGKILLed. Its devices must come back on the
// others with their sessions, no acknowledged message may be lost, and
// the revoked devices must stay out.
func (r *run) failover(ctx context.Context) error {
	st := &FailoverStat{MovedTo: map[string]int{}}
	r.rep.Failover = st
	killIdx := len(r.cl.nodes) - 1
	killed := r.cl.nodes[killIdx]
	live := r.live()
	stop := r.publishLoop(ctx, live, 100*time.Millisecond)
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()
	time.Sleep(500 * time.Millisecond) // traffic flows first

	// Revoke one device of the node about to die and one of node 2,
	// through node 2's API.
	victims := r.failoverVictims(killIdx)
	skip := map[string]bool{}
	seqAtReturn := map[string]int64{}
	if len(victims) > 0 {
		admin2, err := r.adminOf(1)
		if err != nil {
			return err
		}
		for _, v := range victims {
			on := r.cl.nodes[r.nodeIndex(v.broker())].name
			t0 := time.Now()
			if _, err := admin2.DeviceAction(ctx, v.id, "revoke", "fleetsim failover scenario"); err != nil {
				return fmt.Errorf("revoke %s through node2: %w", v.id, err)
			}
			seqAtReturn[v.id] = v.seq.Load()
			skip[v.id] = true
			r.progress("revoked %s (on %s) through node2's API in %s", v.id, on, time.Since(t0).Round(time.Microsecond))
		}
		for _, v := range victims {
			off := waitFor(ctx, 10*time.Second, func() bool { return !v.client().IsConnected() })
			r.rep.check("revoked "+v.id+" is cut off", off, "connected=%v", !off)
		}
	}
	st.Revoked = len(victims)

	// The devices on the node about to die, as the clients see it.
	onKilled := r.devicesOn(killIdx, skip)
	st.Killed, st.KilledPID, st.DevicesOnKilled = killed.name, killed.pid(), len(onKilled)
	connectsBefore := map[string]int64{}
	for _, d := range onKilled {
		connectsBefore[d.id] = d.connects.Load()
	}
	killedAt := time.Now()
	if err := killed.kill(); err != nil {
		return fmt.Errorf("kill %s: %w", killed.name, err)
	}
	r.progress("SIGKILL %s (pid %d) with %d devices connected to it", killed.name, st.KilledPID, len(onKilled))

	// Commands to the away devices, published while they are away. A
	// PUBACK comes once JetStream has a quorum again; without it the
	// message waits in the service's session (it is not acknowledged).
	awayCmd := make(map[string]paho.Token, len(onKilled))
	for _, d := range onKilled {
		awayCmd[d.id] = r.backend.Publish("devices/"+d.id+"/commands/while-away", 1, false, "ping")
	}

	// Every device of the dead node back, on another node.
	isBack := func(d *device) bool {
		return d.connects.Load() > connectsBefore[d.id] && d.client().IsConnected() && r.nodeIndex(d.broker()) != killIdx
	}
	back := waitFor(ctx, 90*time.Second, func() bool {
		for _, d := range onKilled {
			if !isBack(d) {
				return false
			}
		}
		return true
	})
	var backLat []time.Duration
	for _, d := range onKilled {
		if isBack(d) {
			st.Back++
			at := time.Unix(0, d.connectedAt.Load())
			backLat = append(backLat, at.Sub(killedAt))
			st.BackAfter = max(st.BackAfter, at.Sub(killedAt))
			if i := r.nodeIndex(d.broker()); i >= 0 {
				st.MovedTo[r.cl.nodes[i].name]++
			}
		}
	}
	st.BackP50, _ = percentiles(backLat)
	r.progress("%d/%d devices of %s back on %v; the last %s after the SIGKILL", st.Back, len(onKilled), killed.name, st.MovedTo, st.BackAfter.Round(time.Millisecond))
	r.rep.check("every device of the killed node is back on another node", back && st.Back == len(onKilled),
		"%d/%d back, the last %s after the SIGKILL", st.Back, len(onKilled), st.BackAfter.Round(time.Millisecond))

	// Their persistent sessions resumed on the other nodes: a command
	// published now reaches each without a new SUBSCRIBE (the session's
	// subscription came with it), and so does every command acknowledged
	// to the service while they were away (queued in the session).
	for _, d := range onKilled {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_ = r.backendAcks.Wait(wctx, r.backend.Publish("devices/"+d.id+"/commands/after-move", 1, false, "ping"))
		cancel()
	}
	// What the devices received, as they saw it (their answers travel as
	// QoS 1 telemetry and may wait for a reconnection when JetStream had no
	// quorum: the broker sends no PUBACK then, and an MQTT client resends
	// only on its next connection).
	answered := func(cmd string, only func(*device) bool) (n int) {
		for _, d := range onKilled {
			if only(d) && d.got(cmd) {
				n++
			}
		}
		return n
	}
	all := func(*device) bool { return true }
	waitFor(ctx, 30*time.Second, func() bool { return answered("after-move", all) == len(onKilled) })
	st.CommandsAnswered = answered("after-move", all)
	// Then the commands acknowledged by now (a snapshot: a PUBACK may
	// still come for the others) must all be received.
	acked := map[string]bool{}
	for _, d := range onKilled {
		if r.backendAcks.Acked(awayCmd[d.id]) {
			acked[d.id] = true
		}
	}
	st.CommandsSent = len(acked)
	inAcked := func(d *device) bool { return acked[d.id] }
	waitFor(ctx, 30*time.Second, func() bool { return answered("while-away", inAcked) == len(acked) })
	st.AwayAnswered = answered("while-away", inAcked)
	var noAfter, noAway []string
	for _, d := range onKilled {
		if !d.got("after-move") {
			noAfter = append(noAfter, d.id+"@"+d.broker())
		}
		if acked[d.id] && !d.got("while-away") {
			noAway = append(noAway, d.id+"@"+d.broker())
		}
	}
	r.rep.check("persistent sessions resumed: a command after the move reached every device without a new SUBSCRIBE", st.CommandsAnswered == len(onKilled),
		"%d of %d devices received it; not: %v", st.CommandsAnswered, len(onKilled), head(noAfter))
	r.rep.check("every command acknowledged to the service while the devices were away reached them", st.AwayAnswered == st.CommandsSent,
		"%d of %d published while away were acknowledged, %d of those received; not: %v", st.CommandsSent, len(onKilled), st.AwayAnswered, head(noAway))

	time.Sleep(time.Second) // the survivors' traffic goes on
	stop()
	stopped = true
	r.waitDelivered(ctx, 30*time.Second)
	// The revoked devices' messages are checked below: the broker may drop
	// what it had acknowledged to them just before the revocation.
	miss := r.missing(skip)
	for _, d := range live {
		if !skip[d.id] {
			d.acked.Range(func(_, _ any) bool { st.Acked++; return true })
		}
	}
	st.AckedLost = len(miss)
	r.rep.check("no acknowledged QoS 1 message was lost", len(miss) == 0, "%d acknowledged, %d missing %v", st.Acked, len(miss), head(miss))

	// The revoked devices stay out: their own reconnect loops kept trying
	// every node, and a fresh attempt on each surviving node is refused;
	// nothing they sent after the revoke returned was delivered.
	for _, v := range victims {
		in := v.client().IsConnected()
		var accepted []string
		for i, nd := range r.cl.nodes {
			if i == killIdx {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := v.dev.Connect(cctx, devicesdk.ConnectOptions{BrokerAddr: nd.addrs.MQTT, ServerName: r.cfg.ServerName})
			cancel()
			if err == nil {
				accepted = append(accepted, nd.name)
				c.Close()
			}
		}
		if in || len(accepted) > 0 {
			st.RevokedBack++
		}
		late := r.recv.maxSeq(v.id) > seqAtReturn[v.id]
		r.rep.check("revoked "+v.id+" stays out after the failover", !in && len(accepted) == 0 && !late,
			"reconnected by itself=%v, accepted by %v, highest delivered seq %d, last seq before the revoke returned %d",
			in, accepted, r.recv.maxSeq(v.id), seqAtReturn[v.id])
	}
	return nil
}

// failoverVictims: one device on the node that will be killed and one on
// node 2, if the fleet is big enough to spare them.
func (r *run) failoverVictims(killIdx int) []*device {
	if len(r.live()) < 6 {
		return nil
	}
	var out []*device
	for _, i := range []int{killIdx, 1} {
		if ds := r.devicesOn(i, nil); len(ds) > 1 {
			out = append(out, ds[len(ds)-1])
		}
	}
	return out
}

// write prints the failover figures.
func (st *FailoverStat) write(w io.Writer) {
	fmt.Fprintf(w, "  failover           SIGKILL %s (pid %d) holding %d devices: %d back on %v, the last %s after the kill (p50 %s)\n",
		st.Killed, st.KilledPID, st.DevicesOnKilled, st.Back, st.MovedTo, st.BackAfter.Round(time.Millisecond), st.BackP50.Round(time.Millisecond))
	fmt.Fprintf(w, "                     sessions: %d of %d devices received a command after the move without subscribing again; %d commands acknowledged while they were away, %d received\n",
		st.CommandsAnswered, st.DevicesOnKilled, st.CommandsSent, st.AwayAnswered)
	fmt.Fprintf(w, "                     QoS 1: %d acknowledged to devices, %d of them lost\n", st.Acked, st.AckedLost)
	fmt.Fprintf(w, "                     revoked: %d, back in: %d\n", st.Revoked, st.RevokedBack)
}
