package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// Replay of an offline persistent session resumed on another node: the
// QoS 1/2 messages for its subscriptions since it went offline are read
// from the stream by one short-lived ordered consumer (never a consumer
// per subscription, none left behind) and put into the session's
// in-flight store, which mochi sends, in order, once the CONNACK is out.
// The node that held the session before forgot it (and what it had
// queued) when this node claimed it. The session's subscriptions take
// live messages here before the replay starts, and the replay reads the
// stream until nothing is pending, so none is skipped; a message may come
// twice (duplicates are allowed). The session's store is then put in
// order: the replayed messages in stream order, then those that arrived
// live, in their order (nothing has been sent yet: the CONNACK is not
// out), so the order per topic is the publisher's.
//
// A replay that cannot be done (no consumer while JetStream elects new
// leaders after a node died) is retried within the CONNECT's deadline; if
// it still fails, the CONNECT is refused (0x88) and the session record
// keeps its replay point (record.Replay), so the next attempt replays.

const (
	// replayMargin is subtracted from a record's ReplayFrom: the stream
	// stamps messages with its servers' clocks, the record with the
	// owner's.
	replayMargin = 2 * time.Second
	// onlineReplay is how far back a session taken over while online is
	// replayed: its unacknowledged messages on the old node are recent.
	onlineReplay = 30 * time.Second
	// replayTimeout bounds a replay and its attempts (it holds the
	// CONNECT, so it also ends before the connection's handshake+CONNECT
	// deadline: connectBudget; past it the CONNECT is refused, and the
	// record keeps its replay point); replayAttempt bounds one attempt;
	// refuseWrite bounds the record's update at a refusal.
	replayTimeout = 10 * time.Second
	replayAttempt = 3 * time.Second
	replayRetry   = 300 * time.Millisecond
	refuseWrite   = time.Second
	// replayMax bounds the messages of one replay when the session's role
	// has no offline quota (mochi's in-flight store holds at most 65,535);
	// otherwise the quota does.
	replayMax = 10_000
)

// replayBounded replays (replay) until one attempt reads the stream to
// its end, for at most budget in all: a consumer cannot be created while
// JetStream elects new leaders after a node died. What a failed attempt
// stored is taken out again before the next one.
func (s *sessions) replayBounded(old *mqtt.Client, subs []sub, from, countFrom time.Time, budget time.Duration) error {
	if budget <= 0 {
		return errors.New("no time left before the connection's CONNECT deadline")
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	for attempt := 1; ; attempt++ {
		stored, st, err := s.replay(ctx, old, subs, from, countFrom)
		if err == nil {
			s.order(old, stored)
			s.r.log.Info("offline session replayed from the stream", "client", old.ID, "messages", len(stored), "from", from,
				"attempts", attempt, "consumers", st.consumers, "read", st.read)
			return nil
		}
		for _, id := range stored {
			old.State.Inflight.Delete(id)
		}
		s.r.log.Warn("offline messages not replayed yet: retrying", "client", old.ID, "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d attempts in %v: %w", attempt, budget.Round(time.Millisecond), err)
		case <-time.After(replayRetry):
		}
	}
}

// replay stores in old's in-flight store the messages of the stream, from
// the time from, that its subscriptions would have queued, in stream
// order, at most the session's offline quota (a single node queues no
// more for an offline session: the first ones); an error means it did not
// read the stream to its end (stored holds what it stored meanwhile).
//
// The consumers read only the subjects of the session's QoS 1/2
// subscriptions (a shared subscription's messages go to a member online
// somewhere, a QoS 0 subscription's are not queued). JetStream refuses a
// consumer whose filters overlap (devices/d/# with devices/d/+/x): such
// filters go to separate consumers (as few as the overlaps allow), whose
// messages are merged by stream sequence. Each consumer is deleted after
// use. (Before, overlapping filters made it read the whole stream, which
// a busy cluster could make too slow to ever finish within an attempt:
// the session could then never resume on another node.)
func (s *sessions) replay(ctx context.Context, old *mqtt.Client, subs []sub, from, countFrom time.Time) (stored []uint16, st replayStats, err error) {
	actx, cancel := context.WithTimeout(ctx, replayAttempt)
	defer cancel()
	var filters []string
	seen := map[string]bool{}
	for _, sb := range subs {
		if sb.Qos == 0 || strings.HasPrefix(sb.Filter, "$share/") {
			continue
		}
		for _, f := range EncodeFilter(sb.Filter) {
			if f = SubjectPrefix + ".1." + f; !seen[f] {
				seen[f] = true
				filters = append(filters, f)
			}
		}
	}
	limit := replayMax
	if q := s.r.b.OfflineQuota(old); q > 0 && q < limit {
		limit = q
	}
	limit = max(limit-old.State.Inflight.Len(), 0)
	if limit == 0 || len(filters) == 0 {
		return nil, st, nil
	}
	// The quota counts what was published after the session went
	// offline (countFrom), as on one node; the margin before it (clocks,
	// or the 30 s before an online takeover) may hold messages the client
	// had already, which must not take the place of newer ones.
	if countFrom.Before(from) {
		countFrom = from
	}
	// The barrier: the end of the stream as its leader has it now, after
	// the live interest is in place (replayBarrier).
	barrier, err := s.r.replayBarrier(actx)
	if err != nil {
		return nil, st, err
	}
	// The first sequence at or after from, as the stream's leader has it,
	// once for every consumer: one started by time on a replica that had
	// just restarted (rebuilding its index) or lagged started past
	// everything it should have read and delivered only the barrier (the
	// chaos scenario's backend, 2026-12-08: read=1, 0 replayed, every
	// message of the 30 s before its takeover lost).
	start, err := s.r.seqAt(actx, from, barrier)
	if err != nil {
		return nil, st, err
	}
	groups := disjointGroups(filters)
	st.consumers = len(groups)
	bySeq := map[uint64]replayed{}
	for _, g := range groups {
		kept, more, read, err := s.readStream(actx, g, barrier, start, countFrom, limit, func(m jetstream.Msg) (packets.Packet, bool) { return s.queued(old, m) })
		st.read += read
		if err != nil {
			return nil, st, err
		}
		st.capped = st.capped || more
		for _, k := range kept {
			bySeq[k.seq] = k
		}
		if firstCounted(bySeq, limit) { // only the first limit counted can be queued
			st.capped = true
		}
	}
	for _, seq := range slices.Sorted(maps.Keys(bySeq)) {
		if id, ok := s.store(old, bySeq[seq].pk); ok {
			stored = append(stored, id)
		}
	}
	if st.capped {
		s.r.log.Warn("replay stopped at the session's offline quota: later messages not queued for it (as on one node)",
			"client", old.ID, "quota", limit, "read", st.read)
	}
	return stored, st, nil
}

// replayStats: how many consumers a replay used and messages they read;
// capped: it stopped at the session's quota (or its read bound).
type replayStats struct {
	consumers, read int
	capped          bool
}

// replayed is a message of the stream the session would have queued;
// counts: it was published after the session went offline (the quota
// counts it).
type replayed struct {
	seq    uint64
	pk     packets.Packet
	counts bool
}

// firstCounted keeps in bySeq, by stream sequence, the first limit
// messages that count and the last limit of those that do not (the
// margin, possibly delivered already); it reports whether it dropped any
// that counts.
func firstCounted(bySeq map[uint64]replayed, limit int) bool {
	seqs := slices.Sorted(maps.Keys(bySeq))
	n, dropped := 0, false
	var margin []uint64
	for _, seq := range seqs {
		if !bySeq[seq].counts {
			margin = append(margin, seq)
			continue
		}
		if n++; n > limit {
			delete(bySeq, seq)
			dropped = true
		}
	}
	for _, seq := range margin[:max(0, len(margin)-limit)] {
		delete(bySeq, seq)
	}
	return dropped
}

// readStream reads, with one ordered consumer (deleted after), the
// messages of the stream on subjects from the sequence start, until keep has
// taken limit of them stamped at or after countFrom, or the barrier (the
// stream's end when the replay began); more: it stopped with more
// pending. What keep refuses is read past, up to a bound (readBound).
func (s *sessions) readStream(ctx context.Context, subjects []string, b barrier, start uint64, countFrom time.Time, limit int,
	keep func(jetstream.Msg) (packets.Packet, bool)) (kept []replayed, more bool, read int, err error) {
	filters := subjects
	if !slices.ContainsFunc(subjects, func(f string) bool { return subjectsOverlap(f, b.subject) }) {
		filters = append(slices.Clip(subjects), b.subject) // else a filter already takes it
	}
	cons, err := s.r.js.OrderedConsumer(ctx, Stream, jetstream.OrderedConsumerConfig{FilterSubjects: filters,
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start, InactiveThreshold: 30 * time.Second})
	if err != nil {
		return nil, false, 0, fmt.Errorf("replay consumer not created: %w", err)
	}
	defer func() {
		if info := cons.CachedInfo(); info != nil {
			dctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = s.r.js.DeleteConsumer(dctx, Stream, info.Name) // else gone after InactiveThreshold
			cancel()
		}
	}()
	bound := readBound(limit)
	var margin []replayed // the newest limit of the margin at most
	counted, marginRead, countedRead := 0, 0, 0
	for counted < limit && countedRead < bound {
		if ctx.Err() != nil {
			return nil, false, read, fmt.Errorf("stream not read to its end: %w", ctx.Err())
		}
		batch, err := cons.Fetch(256, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			return nil, false, read, fmt.Errorf("replay fetch: %w", err)
		}
		for m := range batch.Messages() {
			read++
			md, err := m.Metadata()
			if err != nil {
				continue
			}
			if md.Sequence.Stream >= b.seq {
				return append(margin, kept...), false, read, nil // the end when the replay began
			}
			if isMark(m.Subject()) {
				continue // another replay's barrier
			}
			if md.Timestamp.Before(countFrom) {
				if marginRead++; marginRead > bound {
					// The margin alone is too long to read within an
					// attempt: what counts is read from countFrom.
					next, err := s.r.seqAt(ctx, countFrom, b)
					if err != nil {
						return nil, false, read, err
					}
					rest, more, n, err := s.readStream(ctx, subjects, b, next, countFrom, limit, keep)
					return append(margin, rest...), more, read + n, err
				}
				if pk, ok := keep(m); ok {
					pk.Created = md.Timestamp.Unix() // its time in the stream (store, order)
					if len(margin) == limit {
						margin = margin[1:]
					}
					margin = append(margin, replayed{md.Sequence.Stream, pk, false})
				}
			} else {
				countedRead++
				if counted == limit {
					return append(margin, kept...), true, read, nil // more past the limit
				}
				if pk, ok := keep(m); ok {
					pk.Created = md.Timestamp.Unix() // its time in the stream (store, order)
					kept = append(kept, replayed{md.Sequence.Stream, pk, true})
					counted++
				}
			}
		}
	}
	return append(margin, kept...), true, read, nil
}

// barrier is a marker message in the stream: its sequence (seq) and
// subject.
type barrier struct {
	seq     uint64
	subject string
}

// seqAt returns the sequence of the first message of the stream stamped at
// or after t, as the stream's leader answers it (the MSG.GET API, not a
// direct get, which any replica answers; nats.go's GetMsg has no start
// time, hence the request by hand); b.seq if there is none before the
// barrier.
func (r *Router) seqAt(ctx context.Context, t time.Time, b barrier) (uint64, error) {
	req, _ := json.Marshal(struct {
		StartTime time.Time `json:"start_time"`
		NextFor   string    `json:"next_by_subj"`
		NoHeaders bool      `json:"no_hdr"`
	}{t.UTC(), SubjectPrefix + ".1.>", true})
	m, err := r.cfg.NC.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET."+Stream, req)
	if err != nil {
		return 0, fmt.Errorf("replay start not found (no stream leader?): %w", err)
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
		Message *struct {
			Seq uint64 `json:"seq"`
		} `json:"message"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, fmt.Errorf("replay start: %w", err)
	}
	switch {
	case resp.Error != nil && resp.Error.Code == 10037: // no message found
		return b.seq, nil
	case resp.Error != nil:
		return 0, fmt.Errorf("replay start: %s (%d)", resp.Error.Description, resp.Error.Code)
	case resp.Message == nil:
		return 0, errors.New("replay start: empty answer")
	}
	return min(resp.Message.Seq, b.seq), nil
}

// markToken starts the subject of a barrier after fg.m.1: no topic
// encodes to it (codec.go writes '$' as ~24), so no MQTT message has it.
const markToken = "$mark"

// isMark reports whether subject is a barrier's.
func isMark(subject string) bool {
	return strings.HasPrefix(subject, SubjectPrefix+".1."+markToken+".")
}

// replayBarrier publishes a marker into the stream and returns it. A
// replay reads up to it, not "until nothing is pending": nats-server
// places a replay's (R1) consumer on any replica of the stream whose
// server has caught up with the meta group, also one that rejoined and is
// still catching up on the stream itself, whose store lacks what was
// stored meanwhile; "nothing pending" there ended the replay without
// those messages (a node restarted and claimed at once: 0 of 10 replayed,
// 2026-12-08). A replica delivers the marker only after everything the
// leader stored before it.
func (r *Router) replayBarrier(ctx context.Context) (barrier, error) {
	subject := SubjectPrefix + ".1." + markToken + "." + nuid.Next()
	ack, err := r.js.Publish(ctx, subject, nil)
	if err != nil {
		return barrier{}, fmt.Errorf("replay barrier not written (no quorum?): %w", err)
	}
	return barrier{seq: ack.Sequence, subject: subject}, nil
}

// readBound bounds the messages one replay consumer reads: what its
// session would not have queued (its own messages under No Local, topics
// its ACL no longer lets it read) is read past, but not without end.
func readBound(limit int) int { return max(4*limit, 4096) }

// disjointGroups puts the NATS subject filters into as few groups as it
// can with no two overlapping filters in a group (JetStream refuses
// overlapping filters in one consumer), in order.
func disjointGroups(filters []string) [][]string {
	var groups [][]string
next:
	for _, f := range filters {
		for i, g := range groups {
			if !slices.ContainsFunc(g, func(h string) bool { return subjectsOverlap(f, h) }) {
				groups[i] = append(g, f)
				continue next
			}
		}
		groups = append(groups, []string{f})
	}
	return groups
}

// subjectsOverlap: some subject matches both filters ("*" one token, ">"
// one or more, last).
func subjectsOverlap(a, b string) bool {
	ta, tb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; ; i++ {
		switch {
		case i == len(ta) || i == len(tb):
			return len(ta) == len(tb)
		case ta[i] == ">" || tb[i] == ">":
			return true
		case ta[i] != tb[i] && ta[i] != "*" && tb[i] != "*":
			return false
		}
	}
}

// order renumbers old's queued messages: the replayed ones (stored, in
// stream order) first, then the others in the order they arrived.
func (s *sessions) order(old *mqtt.Client, stored []uint16) {
	if len(stored) == 0 {
		return
	}
	s.r.pause.Lock()
	defer s.r.pause.Unlock()
	replayed := map[uint16]bool{}
	var all []packets.Packet
	for _, id := range stored {
		if pk, ok := old.State.Inflight.Get(id); ok {
			replayed[id] = true
			all = append(all, pk)
		}
	}
	for _, pk := range old.State.Inflight.GetAll(false) { // by arrival
		if !replayed[pk.PacketID] {
			all = append(all, pk)
		}
	}
	for _, pk := range all {
		old.State.Inflight.Delete(pk.PacketID)
	}
	// IDs from the client's counter (ascending, never one in use), so a
	// message a local publisher queues meanwhile keeps its own. mochi
	// resends by (Created, packet ID): Created is made non-decreasing in
	// this order, and stays at most a message's own time where the order
	// allows (a replayed message's is its time in the stream, so that a
	// disconnect before its PUBACK replays from there, wherever the
	// session goes: stamped "now", it was lost to a later move).
	var created int64
	for _, pk := range all {
		id, err := old.NextPacketID()
		if err != nil {
			break
		}
		created = max(created, pk.Created)
		pk.PacketID, pk.Created = uint16(id), created
		old.State.Inflight.Set(pk)
	}
}

// queued is the packet old's session would have queued for a message of
// the stream: one of its subscriptions matches it at QoS 1/2, No Local
// does not exclude it, and the ACL lets it read it.
func (s *sessions) queued(old *mqtt.Client, m jetstream.Msg) (packets.Packet, bool) {
	pk, ok := s.r.packet(&nats.Msg{Subject: m.Subject(), Data: m.Data(), Header: m.Headers()})
	if !ok || pk.FixedHeader.Qos == 0 || s.r.revokedOrigin(pk) {
		return packets.Packet{}, false
	}
	subs := s.r.srv.Topics.Subscribers(pk.TopicName)
	sb, ok := subs.Subscriptions[old.ID]
	if !ok || sb.Qos == 0 || (sb.NoLocal && pk.Origin == old.ID) {
		return packets.Packet{}, false
	}
	if !s.r.b.Auth().OnACLCheck(old, pk.TopicName, false) {
		return packets.Packet{}, false
	}
	out := pk.Copy(false)
	out.FixedHeader.Qos = min(pk.FixedHeader.Qos, sb.Qos)
	return out, true
}

// store puts a packet queued puts into old's in-flight store, with the
// next packet ID of the client (its Created is its time in the stream).
func (s *sessions) store(old *mqtt.Client, pk packets.Packet) (uint16, bool) {
	id, err := old.NextPacketID()
	if err != nil {
		return 0, false
	}
	pk.PacketID = uint16(id)
	if pk.Created <= 0 {
		pk.Created = time.Now().Unix()
	}
	return pk.PacketID, old.State.Inflight.Set(pk)
}
