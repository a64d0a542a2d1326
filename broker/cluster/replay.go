package cluster

import (
	"context"
	"errors"
	"fmt"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
	// replayMax bounds the messages of one replay (mochi's in-flight
	// store holds at most 65,535; the offline quotas are smaller).
	replayMax = 10_000
)

// replayBounded replays (replay) until one attempt reads the stream to
// its end, for at most budget in all: a consumer cannot be created while
// JetStream elects new leaders after a node died. What a failed attempt
// stored is taken out again before the next one.
func (s *sessions) replayBounded(old *mqtt.Client, subs []sub, from time.Time, budget time.Duration) error {
	if budget <= 0 {
		return errors.New("no time left before the connection's CONNECT deadline")
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	for attempt := 1; ; attempt++ {
		stored, err := s.replay(ctx, old, subs, from)
		if err == nil {
			s.order(old, stored)
			s.r.log.Info("offline session replayed from the stream", "client", old.ID, "messages", len(stored), "from", from, "attempts", attempt)
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
// the time from, that its subscriptions match; an error means it did not
// read the stream to its end (stored holds what it stored meanwhile).
func (s *sessions) replay(ctx context.Context, old *mqtt.Client, subs []sub, from time.Time) (stored []uint16, err error) {
	actx, cancel := context.WithTimeout(ctx, replayAttempt)
	defer cancel()
	var filters []string
	seen := map[string]bool{}
	for _, sb := range subs {
		for _, f := range EncodeFilter(sb.Filter) {
			if f = SubjectPrefix + ".1." + f; !seen[f] {
				seen[f] = true
				filters = append(filters, f)
			}
		}
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: filters, DeliverPolicy: jetstream.DeliverByStartTimePolicy,
		OptStartTime: &from, InactiveThreshold: 30 * time.Second}
	cons, err := s.r.js.OrderedConsumer(actx, Stream, cfg)
	if err != nil {
		// Overlapping filters (a/+ and a/b) are refused by JetStream: read
		// every subject; the session's subscriptions select below.
		cfg.FilterSubjects = nil
		if cons, err = s.r.js.OrderedConsumer(actx, Stream, cfg); err != nil {
			return nil, fmt.Errorf("replay consumer not created: %w", err)
		}
	}
	info, err := cons.Info(actx)
	if err != nil {
		return nil, fmt.Errorf("replay consumer: %w", err)
	}
	if info.NumPending == 0 {
		return nil, nil
	}
	for len(stored) < replayMax {
		if actx.Err() != nil {
			return stored, fmt.Errorf("stream not read to its end: %w", actx.Err())
		}
		batch, err := cons.Fetch(256, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			return stored, fmt.Errorf("replay fetch: %w", err)
		}
		last := false
		for m := range batch.Messages() {
			if id, ok := s.store(old, m); ok {
				stored = append(stored, id)
			}
			if md, err := m.Metadata(); err == nil && md.NumPending == 0 {
				last = true
			}
		}
		if last {
			return stored, nil
		}
	}
	return stored, nil
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
	// message a local publisher queues meanwhile keeps its own.
	now := time.Now().Unix()
	for _, pk := range all {
		id, err := old.NextPacketID()
		if err != nil {
			break
		}
		pk.PacketID, pk.Created = uint16(id), now
		old.State.Inflight.Set(pk)
	}
}

// store puts one replayed message into old's in-flight store if one of
// its subscriptions matches it and the ACL lets it read it.
func (s *sessions) store(old *mqtt.Client, m jetstream.Msg) (uint16, bool) {
	pk, ok := s.r.packet(&nats.Msg{Subject: m.Subject(), Data: m.Data(), Header: m.Headers()})
	if !ok || pk.FixedHeader.Qos == 0 {
		return 0, false
	}
	subs := s.r.srv.Topics.Subscribers(pk.TopicName)
	sb, ok := subs.Subscriptions[old.ID]
	if !ok || sb.Qos == 0 || (sb.NoLocal && pk.Origin == old.ID) {
		return 0, false
	}
	if !s.r.b.Auth().OnACLCheck(old, pk.TopicName, false) {
		return 0, false
	}
	id, err := old.NextPacketID()
	if err != nil {
		return 0, false
	}
	out := pk.Copy(false)
	out.PacketID = uint16(id)
	out.FixedHeader.Qos = min(pk.FixedHeader.Qos, sb.Qos)
	out.Created = time.Now().Unix()
	return out.PacketID, old.State.Inflight.Set(out)
}
