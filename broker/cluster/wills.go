package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
)

// Wills across nodes: each is sent once, by one node, decided by
// compare-and-swap on the session record, which holds the connection's
// will while it may still be sent. Whoever sends a will first takes it out
// of the record (claimWill); whoever finds it gone sends nothing:
//   - the connection's own node, when the connection ends abnormally:
//     mochi runs the OnWill hooks just before it publishes a will (a
//     delayed one when it is due), and the router's claims it there; a
//     node that cannot reach the quorum cannot claim, so it sends nothing;
//   - the node that took the session over while the connection was online
//     (the record's Prev): at once if the old node did not confirm closing
//     the connection within kickTimeout (dead, cut off, or alive and slow:
//     then its own claim, at the close, finds the will gone); else after
//     claimGrace, if the old node has not claimed it by then;
//   - a surviving node that sweeps a dead node's records (below).
//
// Dead nodes: every node writes its liveness key in the KV bucket fg_nodes
// every second (acknowledged by a majority only, so a node cut off from
// the quorum stops writing it). A node that could write its own key and
// sees another's older than its dead bound (Router.deadAfter: 2 s past the
// second staleness bound, so that a node cut off from the quorum has
// closed its own connections before the others send their wills) sweeps
// that node's records: each
// online one is marked offline by compare-and-swap, and the node whose
// swap succeeded publishes the will — one node, once. A will with an MQTT
// 5 Will Delay Interval stays in the record instead and is claimed when
// the delay has passed (from the sweep, or from the disconnect the record
// shows); a reconnect within the delay, on any node, rewrites the record
// without it, so the claim finds nothing: the will is cancelled
// [MQTT-3.1.2-8]. A clean start ends the session, and with it the delay:
// the new node sends the will at once. A session resumed later on any node
// is replayed from the dead node's last proof of life.

// NodesBucket is the KV bucket of node liveness keys.
const NodesBucket = "fg_nodes"

const (
	liveEvery = time.Second
	deadAfter = 5 * time.Second // at least; see Router.deadAfter
	// claimGrace: after the old node confirmed closing a taken-over
	// connection, how long the new node leaves it to claim the will.
	claimGrace = 5 * time.Second
)

// openLive opens the liveness bucket and writes this node's key once: a
// node is ready only when the others can see it alive.
func (s *sessions) openLive(ctx context.Context) error {
	kv, err := natsnode.Bucket(ctx, s.r.js, NodesBucket)
	if err != nil {
		return err
	}
	if s.prevSeen.IsZero() {
		// This node's last proof of life before this start (restart.go).
		e, err := kv.Get(ctx, s.r.cfg.Node)
		switch {
		case err == nil:
			s.prevSeen = e.Created()
		case !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted):
			return err
		}
	}
	if _, err := kv.Put(ctx, s.r.cfg.Node, []byte(time.Now().UTC().Format(time.RFC3339Nano))); err != nil {
		return err
	}
	s.nodes = kv
	return nil
}

// will is a session's Last Will.
type will struct {
	Topic   string                 `json:"topic"`
	Payload []byte                 `json:"payload,omitempty"`
	Qos     byte                   `json:"qos"`
	Retain  bool                   `json:"retain,omitempty"`
	User    []packets.UserProperty `json:"user,omitempty"`
	// Delay is the MQTT 5 Will Delay Interval, seconds.
	Delay uint32 `json:"delay,omitempty"`
}

func willOf(cl *mqtt.Client) *will {
	w := cl.Properties.Will
	if w.Flag == 0 || w.TopicName == "" {
		return nil
	}
	return &will{Topic: w.TopicName, Payload: w.Payload, Qos: w.Qos, Retain: w.Retain, User: w.User, Delay: w.WillDelayInterval}
}

// pendingWill is the will of prev's connection that a new connection's
// record keeps (as Prev) to be claimed, or nil: none, or a delayed will
// cancelled because the new connection resumes the session.
func pendingWill(prev *record, clean bool) *prevWill {
	if prev == nil || prev.Will == nil || (prev.Will.Delay > 0 && !clean) {
		return nil
	}
	return &prevWill{Conn: prev.Conn, Will: prev.Will}
}

// claimWill takes the will of connection conn of client id out of its
// record by compare-and-swap; ok means the caller must send it (and is
// the only one). Not ok: sent or cancelled already, or the record cannot
// be read or written (no quorum: a surviving node decides).
func (s *sessions) claimWill(ctx context.Context, id, conn string) (*will, bool) {
	if s.kv == nil {
		return nil, false
	}
	key := sessionKey(id)
	for range 5 {
		e, err := s.kv.Get(ctx, key)
		if err != nil {
			if !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted) && !s.r.unwritten(id, "will (record not read)", err) {
				s.r.log.Warn("will not claimed: session record not read (no quorum?); not sent from here", "client", id, "err", err)
			}
			return nil, false
		}
		var rec record
		if json.Unmarshal(e.Value(), &rec) != nil {
			return nil, false
		}
		var w *will
		switch {
		case rec.Conn == conn && rec.Will != nil:
			w, rec.Will = rec.Will, nil
		case rec.Prev != nil && rec.Prev.Conn == conn && rec.Prev.Will != nil:
			w, rec.Prev = rec.Prev.Will, nil
		default:
			return nil, false // sent by another node, or cancelled
		}
		b, _ := json.Marshal(rec)
		_, err = s.kv.Update(ctx, key, b, e.Revision())
		if err == nil {
			return w, true
		}
		if !strings.Contains(err.Error(), "wrong last sequence") {
			if s.r.unwritten(id, "will (record not written)", err) {
				return nil, false
			}
			s.r.log.Warn("will not claimed: session record not written (no quorum?); not sent from here", "client", id, "err", err)
			return nil, false
		}
	}
	return nil, false
}

// claimLater claims the will of a taken-over connection after claimGrace
// (its old node did not) and sends it.
func (s *sessions) claimLater(id, conn string) {
	select {
	case <-s.r.stop:
		return
	case <-time.After(claimGrace):
	}
	ctx, cancel := s.r.opCtx()
	defer cancel()
	if w, ok := s.claimWill(ctx, id, conn); ok {
		s.r.log.Info("will of a taken-over connection not claimed by its old node: sending it", "client", id)
		s.sendWill(ctx, id, w)
	}
}

// claimAt claims and sends a delayed will of connection conn when it is
// due (at), unless the router stops first. A reconnect meanwhile rewrote
// the record without it: the claim finds nothing.
func (s *sessions) claimAt(id, conn string, at time.Time) {
	s.r.wg.Add(1)
	go func() {
		defer s.r.wg.Done()
		t := time.NewTimer(time.Until(at))
		defer t.Stop()
		select {
		case <-s.r.stop:
			return
		case <-t.C:
		}
		ctx, cancel := s.r.opCtx()
		defer cancel()
		if w, ok := s.claimWill(ctx, id, conn); ok {
			s.sendWill(ctx, id, w)
		} else {
			s.r.log.Info("delayed will of a dead node's session not sent: the client reconnected, or another node sent it", "client", id)
		}
	}()
}

// onWill decides, when mochi is about to publish cl's will, whether this
// node sends it: only if it claims it (claimWill). A will of a client
// without a session record here (refused at CONNECT) goes as before.
func (s *sessions) onWill(cl *mqtt.Client, w mqtt.Will) mqtt.Will {
	if cl.Net.Inline || w.TopicName == "" {
		return w
	}
	conn, ok := s.connOf(cl)
	if !ok {
		return w
	}
	ctx, cancel := s.r.opCtx()
	defer cancel()
	if _, ok := s.claimWill(ctx, cl.ID, conn); !ok {
		s.r.log.Info("will not sent from this node: sent by another, cancelled, or not claimable (no quorum)", "client", cl.ID)
		return mqtt.Will{}
	}
	return w
}

// deadAfter is how old another node's liveness key must be before this
// node sweeps its sessions: 2 s past the second staleness bound (a node
// cut off from the quorum goes stale, then closes its sessions, from
// about when it last wrote its key), at least deadAfter.
func (r *Router) deadAfter() time.Duration {
	return max(deadAfter, r.cfg.StaleCloseAfter+2*time.Second)
}

// live writes this node's liveness key and sweeps dead nodes until ctx
// ends.
func (s *sessions) live(ctx context.Context) {
	kv := s.nodes
	swept := map[string]uint64{} // node → revision of its key when swept
	t := time.NewTicker(liveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		wctx, cancel := context.WithTimeout(ctx, liveEvery)
		_, err := kv.Put(wctx, s.r.cfg.Node, []byte(time.Now().UTC().Format(time.RFC3339Nano)))
		cancel()
		if err != nil {
			s.r.log.Debug("liveness key not written (minority?)", "err", err)
			continue // not on the majority side: judge nobody
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		keys, err := kv.Keys(lctx)
		if err != nil {
			s.r.log.Debug("liveness keys not listed", "err", err)
		}
		for _, node := range keys {
			if err != nil || node == s.r.cfg.Node {
				continue
			}
			e, gerr := kv.Get(lctx, node)
			if gerr != nil || time.Since(e.Created()) < s.r.deadAfter() || swept[node] == e.Revision() {
				continue
			}
			s.r.log.Warn("cluster node silent: sending the wills of its sessions", "dead", node, "last_seen", e.Created())
			// A sweep of its own time: one cut short (timeouts under load,
			// a leader election) is done again at the next tick; what it
			// did already is not done twice (compare-and-swap).
			sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
			if s.sweep(sctx, node, e.Created(), nil) {
				swept[node] = e.Revision()
			}
			scancel()
		}
		cancel()
	}
}

// sweep takes over the online records of a dead node: each is replayed
// from lastSeen, or from earliest[client ID] if that is earlier (the
// oldest unacknowledged message a restarted node's own copy held).
func (s *sessions) sweep(ctx context.Context, dead string, lastSeen time.Time, earliest map[string]time.Time) (complete bool) {
	lister, err := s.kv.ListKeys(ctx)
	if err != nil {
		return false
	}
	complete = true
	for key := range lister.Keys() {
		id, ok := keyID(key)
		if !ok {
			continue
		}
		e, err := s.kv.Get(ctx, key)
		if err != nil {
			if !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted) {
				complete = false
			}
			continue
		}
		var rec record
		if json.Unmarshal(e.Value(), &rec) != nil || rec.Node != dead {
			continue
		}
		if !rec.Online {
			// A delayed will the dead node was waiting to send.
			if w := rec.Will; w != nil && w.Delay > 0 {
				s.claimAt(id, rec.Conn, rec.Since.Add(time.Duration(w.Delay)*time.Second))
			}
			continue
		}
		w := rec.Will
		rec.Online, rec.Since = false, time.Now().UTC()
		from := lastSeen
		if t, ok := earliest[id]; ok && t.Before(from) {
			from = t
		}
		if !rec.Replay || from.Before(rec.ReplayFrom) {
			rec.ReplayFrom = from.UTC()
		}
		if w == nil || w.Delay == 0 {
			rec.Will = nil // claimed here by the swap below
		}
		b, _ := json.Marshal(rec)
		if _, err := s.kv.Update(ctx, key, b, e.Revision()); err != nil {
			if !strings.Contains(err.Error(), "wrong last sequence") {
				complete = false
			}
			continue // another node swept it, or the client came back
		}
		switch {
		case w == nil:
		case w.Delay > 0:
			// The delay runs from now (the connection ended at the
			// latest now): claimed then, unless the client reconnects.
			s.r.log.Info("delayed will of a dead node's session waits its delay", "client", id, "delay_s", w.Delay)
			s.claimAt(id, rec.Conn, rec.Since.Add(time.Duration(w.Delay)*time.Second))
		default:
			s.sendWill(ctx, id, w)
		}
	}
	return complete && ctx.Err() == nil
}

// sendWill publishes a dead connection's will: to the other nodes, into the
// retained bucket if it retains, and to this node's subscribers.
func (s *sessions) sendWill(ctx context.Context, id string, w *will) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: w.Qos, Retain: w.Retain},
		TopicName: w.Topic, Payload: w.Payload, Origin: id, Created: time.Now().Unix()}
	pk.Properties.User = w.User
	r := s.r
	if w.Retain {
		if err := r.retain(ctx, pk, id); err != nil {
			r.log.Warn("will not retained in the cluster", "client", id, "err", err)
		}
	}
	m := r.message(pk, id)
	if pk.FixedHeader.Qos == 0 {
		if err := r.cfg.NC.PublishMsg(m); err != nil {
			r.log.Warn("will of a dead node's session not routed", "client", id, "err", err)
		}
	} else {
		r.publishWill(ctx, m, id)
	}
	if pk.FixedHeader.Qos > 0 {
		pk.PacketID = 1
	}
	r.pause.RLock()
	err := r.srv.InjectPacket(r.route, pk)
	r.pause.RUnlock()
	if err != nil {
		r.log.Warn("will of a dead node's session not delivered here", "client", id, "err", err)
	}
	r.log.Info("will of a dead node's session sent", "client", id, "topic", w.Topic)
}

// willRouteTimeout bounds the retries of a QoS 1/2 will's publication into
// the stream.
const willRouteTimeout = 30 * time.Second

// publishWill puts a QoS 1/2 will into the stream, the only way it reaches
// the other nodes' subscribers. A will is claimed once, in the session
// record, so a publication that fails would lose it for every other node:
// it is tried once within ctx, then again in the background, backing off,
// until JetStream acknowledges it or willRouteTimeout (or the node's stop)
// ends it. Right after a node is lost, JetStream answers "no response from
// stream" while it elects the stream's leader. The message ID lets
// JetStream drop a copy stored twice (an acknowledgement lost after the
// write).
func (r *Router) publishWill(ctx context.Context, m *nats.Msg, client string) {
	msgID := jetstream.WithMsgID(m.Header.Get(hID))
	if _, err := r.js.PublishMsg(ctx, m, msgID); err == nil {
		return
	}
	go func() {
		ctx, cancel := r.opCtxWithin(willRouteTimeout)
		defer cancel()
		for wait := 100 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
			select {
			case <-ctx.Done():
				r.log.Warn("will not routed to the other nodes: JetStream did not acknowledge it", "client", client, "err", ctx.Err())
				return
			case <-r.stop:
				return
			case <-time.After(wait):
			}
			_, err := r.js.PublishMsg(ctx, m, msgID)
			if err == nil {
				r.log.Info("will routed to the other nodes after a retry", "client", client)
				return
			}
			r.log.Debug("will not routed yet", "client", client, "err", err)
		}
	}()
}
