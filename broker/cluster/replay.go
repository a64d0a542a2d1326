package cluster

import (
	"context"
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

const (
	// replayMargin is subtracted from a record's ReplayFrom: the stream
	// stamps messages with its servers' clocks, the record with the
	// owner's.
	replayMargin = 2 * time.Second
	// onlineReplay is how far back a session taken over while online is
	// replayed: its unacknowledged messages on the old node are recent.
	onlineReplay = 30 * time.Second
	// replayTimeout bounds one replay (it holds the CONNECT).
	replayTimeout = 10 * time.Second
	// replayMax bounds the messages of one replay (mochi's in-flight
	// store holds at most 65,535; the offline quotas are smaller).
	replayMax = 10_000
)

// replay fills old's in-flight store from the stream, from the time from.
func (s *sessions) replay(old *mqtt.Client, subs []sub, from time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), replayTimeout)
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
	cons, err := s.r.js.OrderedConsumer(ctx, Stream, cfg)
	if err != nil {
		// Overlapping filters (a/+ and a/b) are refused by JetStream: read
		// every subject; the session's subscriptions select below.
		cfg.FilterSubjects = nil
		if cons, err = s.r.js.OrderedConsumer(ctx, Stream, cfg); err != nil {
			s.r.log.Warn("offline messages not replayed", "client", old.ID, "err", err)
			return
		}
	}
	info, err := cons.Info(ctx)
	if err != nil || info.NumPending == 0 {
		return
	}
	var stored []uint16
	for len(stored) < replayMax && ctx.Err() == nil {
		batch, err := cons.Fetch(256, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			break
		}
		last := false
		got := 0
		for m := range batch.Messages() {
			got++
			if id, ok := s.store(old, m); ok {
				stored = append(stored, id)
			}
			if md, err := m.Metadata(); err == nil && md.NumPending == 0 {
				last = true
			}
		}
		if last || got == 0 {
			break
		}
	}
	s.order(old, stored)
	s.r.log.Info("offline session replayed from the stream", "client", old.ID, "messages", len(stored), "from", from)
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
