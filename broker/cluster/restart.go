package cluster

import (
	"context"
	"encoding/json"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// A node's own sessions after a restart (docs/cluster.md, "Broker across
// nodes"). A node started on its data directory restores from its local
// store the persistent sessions it held when it stopped. In a cluster
// such a copy is not the session any more, even one whose record still
// names this node:
//   - it missed what was published while the node was down: the node's
//     consumer of the stream starts at the stream's end;
//   - a session this node had resumed from another node was put in place
//     from the cluster's record, not by a SUBSCRIBE here, so the local
//     store has it without its subscriptions. Taken over as it was, it
//     answered "session present" with no subscription, and its empty list
//     went into the record, and with the session to every node after
//     (the chaos scenario's mass loss, 2026-12-08);
//   - the node died with connections online: their records say online
//     here, and if the node came back before the others judged it dead
//     (Router.deadAfter) nobody sent their wills.
//
// So before the node accepts a CONNECT (Router.Run), it sweeps its own
// records as a survivor sweeps a dead node's (wills.go): each online one
// is marked offline, replayed from the node's last proof of life before
// the restart or from the oldest message the restored copy held unacknowledged,
// whichever is earlier, and its will is claimed and sent, once. Then every
// restored copy whose record it can read is dropped: the client's next
// CONNECT, here or anywhere, resumes the session from the record and the
// stream. A copy with no record (a former single box's session) is kept;
// one whose record could not be read stays marked as restored, and a
// CONNECT treats it as a leftover (trusted).

// takeOverRestored runs once, after the stream and buckets are open and
// before the node is ready.
func (s *sessions) takeOverRestored(ctx context.Context) {
	earliest := map[string]time.Time{}
	s.mu.Lock()
	for id, cl := range s.r.srv.Clients.GetAll() {
		if cl.Net.Inline {
			continue
		}
		s.restored[id] = cl
		for _, pk := range cl.State.Inflight.GetAll(false) {
			if pk.FixedHeader.Type != packets.Publish || pk.Created <= 0 {
				continue
			}
			if c := time.Unix(pk.Created, 0); earliest[id].IsZero() || c.Before(earliest[id]) {
				earliest[id] = c
			}
		}
	}
	n := len(s.restored)
	s.mu.Unlock()
	if !s.prevSeen.IsZero() {
		complete := false
		for attempt := 0; attempt < 3 && !complete && ctx.Err() == nil; attempt++ {
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			complete = s.sweep(sctx, s.r.cfg.Node, s.prevSeen, earliest)
			cancel()
		}
		if !complete && ctx.Err() == nil {
			s.r.log.Warn("sessions this node held before its restart not all marked offline (no quorum?): their wills wait for another node's sweep",
				"last_seen", s.prevSeen)
		}
	}
	if n == 0 {
		return
	}
	dropped := s.reconcileWith(ctx, true)
	s.r.log.Info("sessions restored from the local store dropped: resumed from the cluster at their next CONNECT",
		"restored", n, "dropped", dropped)
}

// trusted reports whether cur, the session of cur.ID held here, is the
// session prev (a record naming this node) describes: not a copy restored
// from the local store at start, and subscribed to every filter of the
// record. A session that is not is a leftover: dropped and resumed from
// the record, with a replay.
func (s *sessions) trusted(cur *mqtt.Client, prev *record) bool {
	s.mu.Lock()
	restored := s.restored[cur.ID] == cur
	s.mu.Unlock()
	if restored {
		return false
	}
	for _, sb := range prev.Subs {
		if _, ok := cur.State.Subscriptions.Get(sb.Filter); !ok {
			return false
		}
	}
	return true
}

// reconcileWith drops each offline session held here whose record exists
// and names another node (or any node, with own); it returns how many it
// dropped. A session with no record is kept (a former single
// box's sessions, which a CONNECT here takes over), and so is one whose
// record it cannot read. The drop is checked again under the sessions'
// lock: a CONNECT of the same client ID records its claim there (s.local)
// before mochi takes anything over, so a session claimed meanwhile is left
// alone. Its cost is one read of the bucket per offline session here
// (docs: "What is not built yet").
func (s *sessions) reconcileWith(ctx context.Context, own bool) int {
	n := 0
	for id, cl := range s.r.srv.Clients.GetAll() {
		if cl.Net.Inline || !cl.Closed() || ctx.Err() != nil {
			continue
		}
		gctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		e, err := s.kv.Get(gctx, sessionKey(id))
		cancel()
		var rec record
		if err != nil || json.Unmarshal(e.Value(), &rec) != nil || (rec.Node == s.r.cfg.Node && !own) {
			continue
		}
		s.dropMu.Lock()
		s.mu.Lock()
		cur, ok := s.r.srv.Clients.Get(id)
		if l := s.local[id]; !ok || cur != cl || !cl.Closed() || (l != nil && l.cl != cl) {
			s.mu.Unlock()
			s.dropMu.Unlock()
			continue // claimed, resumed or reconnected meanwhile
		}
		delete(s.local, id)
		s.forgetLocked(cl)
		s.mu.Unlock()
		s.drop(cl)
		s.dropMu.Unlock()
		n++
	}
	return n
}
