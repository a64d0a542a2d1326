package cluster

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Live QoS 1/2 delivery to a node (docs/cluster.md, "Broker across
// nodes"): ONE ordered JetStream consumer per node on the stream fg_Q1
// (every subject fg.m.1.>), not core NATS. Core NATS is at most once: a
// message the stream stored (so its publisher got a PUBACK) whose core copy
// was still in a route buffer when the publishing node died, or that was
// published while this node's routes or NATS connection were down, never
// reached an online subscriber here. The stream has it; the consumer reads
// the stream in order and, after a NATS reconnect, a consumer reset (missed
// heartbeats, a gap in its delivery sequence, its server gone) or the death
// of the publishing node, resumes from the last stream sequence this node
// applied, so nothing the stream stored is skipped. Messages no local
// session subscribes to (mochi's topic index) and this node's own (mochi
// delivered them locally already) are dropped before injection.
//
// The cost: every node reads every QoS 1/2 message of the cluster.

// q1Heartbeat is the consumer's idle heartbeat: two missed ones make the
// ordered consumer recreate itself from the last applied sequence.
const q1Heartbeat = time.Second

// q1Feed is the node consumer's state.
type q1Feed struct {
	// last is the stream sequence of the last message this node applied
	// (handed to its delivery or dropped as not wanted here).
	last atomic.Uint64
	// dropped counts messages with no local interest or this node's own.
	dropped atomic.Int64
	// restarts counts consumers this node had to create again itself.
	restarts atomic.Int64
	errs     limiter
	// lastTime is the stream time of the last applied message (unix ns);
	// behind is set while the feed may not have applied everything the
	// stream holds (interrupted, or its last message had more pending).
	lastTime atomic.Int64
	behind   atomic.Bool
	// leaderAhead: at the last check (watchLag), the stream's leader had
	// stored more than the feed had applied. The feed's consumer may sit
	// on a replica still catching up (nats-server places it on any), where
	// nothing is pending although the leader holds more.
	leaderAhead atomic.Bool
	// mu orders q1Msg: a message at or below last is a late copy from a
	// consumer already replaced, dropped.
	mu sync.Mutex
}

// appliedUntil is the time up to which this node has applied the stream,
// if it may be behind it: a session leaving the node must be replayed
// (wherever it resumes) from there, not only from its disconnect, since
// what the feed has not applied yet was never queued for it here.
func (f *q1Feed) appliedUntil() (time.Time, bool) {
	if !f.isBehind() {
		return time.Time{}, false
	}
	return time.Unix(0, f.lastTime.Load()), true
}

// isBehind reports whether the feed may not have applied everything the
// stream holds.
func (f *q1Feed) isBehind() bool { return f.behind.Load() || f.leaderAhead.Load() }

// q1LagCheck is how often the feed compares what it applied with the
// stream's leader.
const q1LagCheck = time.Second

// watchLag sets leaderAhead every q1LagCheck from the stream's last
// sequence as its leader answers it (a stream info request is answered by
// the leader), until ctx ends.
func (r *Router) watchLag(ctx context.Context) {
	r.every(ctx, q1LagCheck, func() {
		cctx, cancel := context.WithTimeout(ctx, q1LagCheck)
		st, err := r.js.Stream(cctx, Stream)
		cancel()
		// An unknown answer is taken as behind.
		r.q1.leaderAhead.Store(err != nil || st.CachedInfo().State.LastSeq > r.q1.last.Load())
	})
}

// runQ1 consumes fg_Q1 from the sequence after start until ctx ends,
// creating the consumer again (from the last applied sequence) whenever
// nats.go's ordered consumer gives up.
func (r *Router) runQ1(ctx context.Context, start uint64) {
	f := &r.q1
	if f.last.Load() == 0 {
		f.last.Store(start)
		f.lastTime.Store(time.Now().UnixNano())
	}
	for ctx.Err() == nil {
		from := f.last.Load() + 1
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cons, err := r.js.OrderedConsumer(cctx, Stream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{SubjectPrefix + ".1.>"}, DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
			OptStartSeq: from, InactiveThreshold: 30 * time.Second})
		cancel()
		var cc jetstream.ConsumeContext
		// nats.go's ordered consumer recreates itself after an error with
		// a backoff growing to 10 s, and each attempt may wait 10 s: after
		// a node's death that held live delivery back for tens of seconds.
		// The router recreates it itself, every 500 ms, from last+1.
		failed := make(chan struct{}, 1)
		if err == nil {
			cc, err = cons.Consume(r.q1Msg, jetstream.PullHeartbeat(q1Heartbeat), jetstream.PullExpiry(5*q1Heartbeat),
				jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
					f.behind.Store(true)
					if f.errs.allow() {
						r.log.Warn("QoS 1/2 feed interrupted: resuming from the last applied stream sequence",
							"last_seq", f.last.Load(), "err", err)
					}
					select {
					case failed <- struct{}{}:
					default:
					}
				}))
		}
		if err != nil {
			f.behind.Store(true)
			if f.errs.allow() {
				r.log.Warn("QoS 1/2 feed not started (no quorum or leader election?): retrying", "from_seq", from, "err", err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		r.log.Info("QoS 1/2 feed consuming the stream", "stream", Stream, "from_seq", from)
		select {
		case <-ctx.Done():
			cc.Stop()
			return
		case <-failed:
			cc.Stop()
			f.restarts.Add(1)
		case <-cc.Closed():
			f.behind.Store(true)
			f.restarts.Add(1)
			if ctx.Err() == nil && f.errs.allow() {
				r.log.Warn("QoS 1/2 feed stopped: creating it again from the last applied stream sequence", "last_seq", f.last.Load())
			}
		}
	}
}

// q1Msg applies one message of the stream: dropped if it is this node's
// own or no local session subscribes to its topic, else handed to the
// delivery (the channel all routed messages share, in arrival order).
func (r *Router) q1Msg(m jetstream.Msg) {
	md, err := m.Metadata()
	if err != nil {
		return
	}
	r.q1.mu.Lock()
	defer r.q1.mu.Unlock()
	if md.Sequence.Stream <= r.q1.last.Load() {
		return // a late copy from a consumer already replaced
	}
	defer func() {
		r.q1.last.Store(md.Sequence.Stream)
		r.q1.lastTime.Store(md.Timestamp.UnixNano())
		r.q1.behind.Store(md.NumPending > 0)
	}()
	if isMark(m.Subject()) {
		return // a replay's barrier (replay.go)
	}
	h := m.Headers()
	if h.Get(hNode) == r.cfg.Node || !r.wanted(m.Subject()) {
		r.q1.dropped.Add(1)
		return
	}
	select {
	case r.in <- &nats.Msg{Subject: m.Subject(), Data: m.Data(), Header: h}:
	case <-r.stop:
	}
}

// wanted reports whether a session of this node (online, or offline and
// persistent) subscribes to the topic of subject.
func (r *Router) wanted(subject string) bool {
	rest, ok := strings.CutPrefix(subject, SubjectPrefix+".1.")
	if !ok {
		return false
	}
	topic, ok := DecodeTopic(rest)
	if !ok {
		return true // packet() logs and drops it
	}
	s := r.srv.Topics.Subscribers(topic)
	return len(s.Subscriptions) > 0 || len(s.Shared) > 0
}

// limiter lets one log line through per interval (every refusal and
// interruption is logged, rate-limited).
type limiter struct {
	last atomic.Int64
}

func (l *limiter) allow() bool {
	now := time.Now().UnixNano()
	prev := l.last.Load()
	return now-prev >= int64(time.Second) && l.last.CompareAndSwap(prev, now)
}
