package cluster

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/fleetgate/fleetgate/broker/auth"
	"github.com/fleetgate/fleetgate/cluster/natsnode"
)

// Sessions across nodes. Each client ID has a record in the KV bucket
// fg_sessions: the node that owns the session, the connection (a fresh ID
// per CONNECT), whether it is online, whether it persists, and its
// subscriptions. A CONNECT claims the record by compare-and-swap on the
// key's revision before the broker authenticates the session further; a
// node that cannot write it (no quorum) refuses the CONNECT.
//
// When the record was another node's and online, the new owner asks that
// node (core NATS request, fg.sess.kick.<node>) to close the connection,
// and waits for the answer (bounded: a dead node does not answer), so the
// client ID is not live on two nodes; the old owner closes it with MQTT 5
// reason 0x8E (session taken over) and forgets the session. Every node
// also follows the bucket's subjects: a record claimed elsewhere closes
// and forgets a local session of that client ID even if the request was
// lost. A persistent session resumed on another node gets its
// subscriptions from the record (session present).
//
// A record is changed only by the connection it names (Conn), again by
// compare-and-swap, so a late disconnect of a taken-over connection never
// overwrites the new owner's record.

// SessionsBucket is the KV bucket of session records.
const SessionsBucket = "fg_sessions"

// kickTimeout bounds the wait for the old owner to close a taken-over
// connection.
const kickTimeout = 2 * time.Second

// record is a session record.
type record struct {
	Node       string    `json:"node"`
	Conn       string    `json:"conn"`
	Online     bool      `json:"online"`
	Persistent bool      `json:"persistent"`
	Version    byte      `json:"version"`
	Expiry     uint32    `json:"expiry,omitempty"` // MQTT 5 session expiry interval, seconds
	Subs       []sub     `json:"subs,omitempty"`
	Since      time.Time `json:"since"` // last change of Online
	// ReplayFrom: when the session went offline, the creation time of
	// its oldest unacknowledged QoS 1/2 message, else the disconnect
	// time. A node resuming the session replays the stream from there
	// (less replayMargin).
	ReplayFrom time.Time `json:"replay_from,omitzero"`
	// Replay: the connection that wrote the record must replay the
	// stream from ReplayFrom and has not done it yet. It is written with
	// the claim and taken out once the replay is done; a CONNECT whose
	// replay fails is refused and leaves it, so the client's next attempt,
	// on any node, replays from the same point.
	Replay bool `json:"replay,omitempty"`
	// CountFrom, with Replay: the session's offline quota counts only the
	// messages stamped from then on (a session taken over while online:
	// the claim's time); zero: from ReplayFrom.
	CountFrom time.Time `json:"count_from,omitzero"`
	// Will is the connection's Last Will while it may still be sent: while
	// the connection is online, and while a delayed will waits (wills.go).
	// Whoever sends it first takes it out by compare-and-swap (claimWill).
	Will *will `json:"will,omitempty"`
	// Prev is the will of the connection this record's claim took the
	// session from while it was online, until its old node (at the close)
	// or the new one (if the old did not confirm) claims it.
	Prev *prevWill `json:"prev,omitempty"`
}

// prevWill is a taken-over connection's will, not yet sent.
type prevWill struct {
	Conn string `json:"conn"`
	Will *will  `json:"will"`
}

type sub struct {
	Filter   string `json:"f"`
	Qos      byte   `json:"q"`
	NoLocal  bool   `json:"nl,omitempty"`
	RAP      bool   `json:"rap,omitempty"`
	Handling byte   `json:"rh,omitempty"`
	ID       int    `json:"id,omitempty"`
}

// local is what this node knows of a session it owns.
type local struct {
	conn string
	cl   *mqtt.Client
	rev  uint64 // the record's revision written by the claim
}

type sessions struct {
	r     *Router
	kv    jetstream.KeyValue
	nodes jetstream.KeyValue // liveness keys (wills.go)

	// dropMu orders the drops of local sessions (drop) with the CONNECT
	// claims (s.local) and resumes: a session is never dropped by ID while
	// a CONNECT of the same ID claims or resumes it. Taken before mu.
	dropMu sync.Mutex
	mu     sync.Mutex
	local  map[string]*local // client ID → the connection that owns it here
	// restored: the sessions restored from the local store at start
	// (restart.go), not trusted as the session; prevSeen: this node's
	// last proof of life before this start (its liveness key).
	restored map[string]*mqtt.Client
	prevSeen time.Time
	// conns: client ID → each client connected here with it → its
	// connection's ID in the record, kept (also after an eviction) while
	// its will may still be sent (OnWill).
	conns map[string]map[*mqtt.Client]string

	refusals limiter
}

func newSessions(r *Router) *sessions {
	return &sessions{r: r, local: map[string]*local{}, conns: map[string]map[*mqtt.Client]string{}, restored: map[string]*mqtt.Client{}}
}

// forget drops cl's entry in conns.
func (s *sessions) forget(cl *mqtt.Client) {
	s.mu.Lock()
	s.forgetLocked(cl)
	s.mu.Unlock()
}

func (s *sessions) forgetLocked(cl *mqtt.Client) {
	if m := s.conns[cl.ID]; m != nil {
		delete(m, cl)
		if len(m) == 0 {
			delete(s.conns, cl.ID)
		}
	}
}

// remember records cl's connection ID, and drops the entries of earlier
// clients of the same ID that ended more than a minute ago with no delayed
// will waiting (a CONNECT refused after its claim ends without OnWill or
// OnDisconnect; a minute leaves a connection that is ending time to claim
// its will).
func (s *sessions) remember(cl *mqtt.Client, conn string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.conns[cl.ID]
	if m == nil {
		m = map[*mqtt.Client]string{}
		s.conns[cl.ID] = m
	}
	for old := range m {
		if old.Closed() && !willPending(old) && old.StopTime() > 0 && time.Now().Unix()-old.StopTime() > 60 {
			delete(m, old)
		}
	}
	m[cl] = conn
}

// connOf returns cl's connection ID and forgets it.
func (s *sessions) connOf(cl *mqtt.Client) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	conn, ok := s.conns[cl.ID][cl]
	s.forgetLocked(cl)
	return conn, ok
}

func (s *sessions) open(ctx context.Context) error {
	kv, err := natsnode.Bucket(ctx, s.r.js, SessionsBucket)
	if err != nil {
		return err
	}
	s.kv = kv
	return s.openLive(ctx)
}

// sessionKey is the record's key: the client ID when it is a plain token,
// else its base64url (KV keys allow [-/_=.a-zA-Z0-9]).
func sessionKey(id string) string {
	for i := 0; i < len(id); i++ {
		if !safe(id[i]) {
			return "b." + base64.RawURLEncoding.EncodeToString([]byte(id))
		}
	}
	return "s." + id
}

func keyID(key string) (string, bool) {
	if id, ok := strings.CutPrefix(key, "s."); ok {
		return id, true
	}
	if enc, ok := strings.CutPrefix(key, "b."); ok {
		b, err := base64.RawURLEncoding.DecodeString(enc)
		return string(b), err == nil
	}
	return "", false
}

type kick struct {
	ID   string `json:"id"`
	Conn string `json:"conn"`
}

// run serves takeover requests and follows the bucket until ctx ends.
func (s *sessions) run(ctx context.Context) error {
	nc := s.r.cfg.NC
	ks, err := nc.Subscribe("fg.sess.kick."+s.r.cfg.Node, func(m *nats.Msg) {
		var k kick
		if json.Unmarshal(m.Data, &k) == nil {
			s.evict(k.ID, k.Conn)
		}
		_ = m.Respond([]byte("ok"))
	})
	if err != nil {
		return err
	}
	defer ks.Unsubscribe()
	ws, err := nc.Subscribe("$KV."+SessionsBucket+".>", func(m *nats.Msg) {
		id, ok := keyID(strings.TrimPrefix(m.Subject, "$KV."+SessionsBucket+"."))
		if !ok {
			return
		}
		var rec record
		if json.Unmarshal(m.Data, &rec) == nil && rec.Node != s.r.cfg.Node && rec.Conn != "" && s.owns(id, rec.Conn) {
			// A core subscription also sees writes JetStream refused (a
			// dead-node sweep's compare-and-swap that lost to this node's
			// claim): evict only for a committed claim.
			go s.evictIfClaimed(id)
		}
	})
	if err != nil {
		return err
	}
	defer ws.Unsubscribe()
	go s.reconcileLoop(ctx)
	s.live(ctx)
	<-ctx.Done()
	return nil
}

// reconcileLoop drops this node's leftover offline sessions (reconcile)
// when it starts, and whenever its view of the cluster was unproven for
// more than reconcileStale and is fresh again (cut off, paused, its NATS
// connection lost): the claims it missed meanwhile would have evicted
// them. A leftover stays subscribed and queues messages up to its quota
// for a client that is elsewhere (resume, which drops one at a CONNECT).
func (s *sessions) reconcileLoop(ctx context.Context) {
	s.reconcile(ctx)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	wasStale := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stale := s.r.cfg.Stale != nil && s.r.cfg.Stale() > reconcileStale
		if wasStale && !stale {
			s.reconcile(ctx)
		}
		wasStale = stale
	}
}

// reconcileStale: a view unproven for longer may have missed claims.
const reconcileStale = 2 * time.Second

// reconcile drops each offline session held here whose record names
// another node (reconcileWith, restart.go).
func (s *sessions) reconcile(ctx context.Context) {
	if n := s.reconcileWith(ctx, false); n > 0 {
		s.r.log.Info("leftover offline sessions dropped: other nodes own them now", "sessions", n)
	}
}

// owns reports whether this node holds id's session with a connection
// other than conn.
func (s *sessions) owns(id, conn string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.local[id]
	return l != nil && l.conn != conn
}

// evictIfClaimed evicts the local session of id if the committed record,
// newer than this node's claim, names another connection.
func (s *sessions) evictIfClaimed(id string) {
	s.mu.Lock()
	l := s.local[id]
	s.mu.Unlock()
	if l == nil {
		return
	}
	ctx, cancel := s.r.opCtx()
	defer cancel()
	e, err := s.kv.Get(ctx, sessionKey(id))
	if err != nil {
		return // the takeover's kick request, if any, still evicts
	}
	var rec record
	if json.Unmarshal(e.Value(), &rec) != nil || e.Revision() <= l.rev || rec.Conn == l.conn || rec.Node == s.r.cfg.Node {
		return
	}
	s.evict(id, rec.Conn)
}

// evict closes and forgets the local session of id unless it is the
// connection conn: another node owns it now.
func (s *sessions) evict(id, conn string) {
	s.mu.Lock()
	l := s.local[id]
	if l == nil || l.conn == conn {
		s.mu.Unlock()
		return
	}
	delete(s.local, id)
	s.mu.Unlock()
	srv := s.r.srv
	cl, ok := srv.Clients.Get(id)
	if !ok || (cl != l.cl && !cl.Closed()) {
		return
	}
	// cl is the connection that claimed the record here, or an offline
	// session it left behind (a session resumed for a CONNECT the auth hook
	// refused after the claim): either way the session is the other
	// node's now, and a later return here must resume it from the record.
	if cl.Closed() {
		s.forget(cl) // its delayed will, if any, is cancelled (sendDelayedWill)
	}
	s.r.log.Info("session taken over by another node: closing it here", "client", id)
	_ = srv.DisconnectClient(cl, packets.ErrSessionTakenOver) // 0x8E
	s.dropMu.Lock()
	defer s.dropMu.Unlock()
	if cur, ok := srv.Clients.Get(id); ok && cur != cl {
		return // resumed here meanwhile: only cl's connection goes
	}
	s.drop(cl)
}

// drop removes the local session cl (ended or being closed) from the
// broker: its subscriptions, queued messages and stored state. The caller
// holds dropMu and has checked that cl is the session registered under
// its ID (the topic index, the NATS interest and the stored records are
// keyed by the ID).
func (s *sessions) drop(cl *mqtt.Client) {
	s.mu.Lock()
	if s.restored[cl.ID] == cl {
		delete(s.restored, cl.ID)
	}
	s.mu.Unlock()
	srv := s.r.srv
	srv.UnsubscribeClient(cl)
	cl.ClearInflights()
	if cur, ok := srv.Clients.Get(cl.ID); ok && cur == cl {
		srv.Clients.Delete(cl.ID)
	}
	s.r.setSubjects(cl.ID, nil)
	s.r.b.DropSession(cl)
}

func persistent(cl *mqtt.Client) bool {
	if cl.Properties.ProtocolVersion == 5 {
		return cl.Properties.Props.SessionExpiryInterval > 0
	}
	return !cl.Properties.Clean
}

func subsOf(cl *mqtt.Client) []sub {
	var out []sub
	for _, sb := range cl.State.Subscriptions.GetAll() {
		out = append(out, sub{Filter: sb.Filter, Qos: sb.Qos, NoLocal: sb.NoLocal, RAP: sb.RetainAsPublished,
			Handling: sb.RetainHandling, ID: sb.Identifier})
	}
	return out
}

// identityOK reports whether cl's verified certificate names cl's client
// ID: only then may its CONNECT claim the session (the auth hook refuses
// the others later).
func (s *sessions) identityOK(cl *mqtt.Client) bool {
	cs, ok := cl.Net.Conn.(auth.ConnState)
	if !ok {
		return false
	}
	st := cs.ConnectionState()
	var leaf *x509.Certificate
	if len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
		leaf = st.VerifiedChains[0][0]
	}
	id, err := s.r.b.Auth().Check(leaf)
	name, _, _ := strings.Cut(cl.ID, ":") // a service's further connections: <name>:<suffix>
	return err == nil && id.Name == name
}

// ErrNoSessionRecord is why a CONNECT is refused when its session record
// cannot be written (no JetStream quorum).
var ErrNoSessionRecord = errors.New("broker/cluster: session record not written")

// connect claims the session record of cl's client ID for this node (see
// the type comment). It runs before mochi takes the session over locally,
// so a session resumed from another node is in place (as an offline
// client with its subscriptions) when mochi looks for it.
func (s *sessions) connect(cl *mqtt.Client, pk packets.Packet) error {
	if cl.Net.Inline || !s.identityOK(cl) {
		return nil
	}
	if !s.r.ready.Load() {
		return packets.ErrServerUnavailable
	}
	key := sessionKey(cl.ID)
	conn := nuid.Next()
	ctx, cancel := s.r.opCtx()
	defer cancel()
	var prev *record
	var claimed uint64
	var resumeFrom, countFrom time.Time
	resumeHere := false
	for attempt := 0; ; attempt++ {
		prev = nil
		var rev uint64
		e, err := s.kv.Get(ctx, key)
		switch {
		case err == nil:
			var r record
			if json.Unmarshal(e.Value(), &r) == nil {
				prev = &r
			}
			rev = e.Revision()
		case errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted):
		default:
			return s.refuse(cl, "session record not read (no quorum?)", err)
		}
		rec := record{Node: s.r.cfg.Node, Conn: conn, Online: true, Persistent: persistent(cl),
			Version: cl.Properties.ProtocolVersion, Expiry: cl.Properties.Props.SessionExpiryInterval, Since: time.Now().UTC(),
			Will: willOf(cl)}
		if !pk.Connect.Clean && prev != nil && prev.Persistent {
			rec.Subs = prev.Subs
		}
		rec.Prev = pendingWill(prev, pk.Connect.Clean)
		resumeHere, resumeFrom, countFrom = s.replayDue(cl, pk, prev)
		rec.Replay, rec.ReplayFrom = resumeHere, resumeFrom
		if resumeHere && countFrom.After(resumeFrom) {
			rec.CountFrom = countFrom
		}
		b, _ := json.Marshal(rec)
		if rev == 0 {
			claimed, err = s.kv.Create(ctx, key, b)
		} else {
			claimed, err = s.kv.Update(ctx, key, b, rev)
		}
		if err == nil {
			break
		}
		if attempt < casRetries && casConflict(err) && casBackoff(ctx, attempt) {
			continue // claimed concurrently: read again
		}
		return s.refuse(cl, "session record not written (no quorum?)", err)
	}
	s.dropMu.Lock()
	s.mu.Lock()
	s.local[cl.ID] = &local{conn: conn, cl: cl, rev: claimed}
	s.mu.Unlock()
	s.dropMu.Unlock()
	s.remember(cl, conn)
	if prev == nil {
		return nil
	}
	if prev.Node == s.r.cfg.Node && !resumeHere {
		if old, ok := s.r.srv.Clients.Get(cl.ID); ok && old.Closed() {
			s.forget(old) // mochi cancels its delayed will, if any
		}
		// mochi takes a local session over itself, and sends (or, for a
		// delayed will, cancels) the old connection's will through OnWill.
		return nil
	}
	if prev.Online && prev.Node != s.r.cfg.Node {
		b, _ := json.Marshal(kick{ID: cl.ID, Conn: conn})
		if _, err := s.r.cfg.NC.Request("fg.sess.kick."+prev.Node, b, kickTimeout); err != nil {
			s.r.log.Warn("the session's previous node did not confirm closing it (down?)", "client", cl.ID, "node", prev.Node, "err", err)
			if rec := pendingWill(prev, pk.Connect.Clean); rec != nil {
				// The old node may be gone, or alive and slow: it claims
				// the will when it closes the connection, this node now;
				// the compare-and-swap lets one of them send it.
				if w, ok := s.claimWill(ctx, cl.ID, prev.Conn); ok {
					s.sendWill(ctx, cl.ID, w)
				}
			}
		} else if pendingWill(prev, pk.Connect.Clean) != nil {
			// The old node closed the connection and claims its will; if
			// it cannot (it died meanwhile), this node does, later.
			go s.claimLater(cl.ID, prev.Conn)
		}
	} else if prev.Node != s.r.cfg.Node && pendingWill(prev, pk.Connect.Clean) != nil {
		// An offline session's delayed will ends with the session (clean
		// start): send it now, once.
		if w, ok := s.claimWill(ctx, cl.ID, prev.Conn); ok {
			s.sendWill(ctx, cl.ID, w)
		}
	}
	if resumeHere {
		if old := s.resume(cl, prev); old != nil {
			// Live first: what is published from now on is queued for the
			// session here (the node's consumer of the stream finds its
			// subscriptions in mochi's index); the replay then reads the
			// stream up to now.
			s.r.setSubjects(cl.ID, subjectsOf(old))
			if h := beforeReplay.Load(); h != nil {
				(*h)(s.r.cfg.Node)
			}
			if err := s.replayBounded(old, prev.Subs, resumeFrom.Add(-replayMargin), countFrom, connectBudget(cl)); err != nil {
				s.unresume(cl, old)
				return s.refuse(cl, "offline messages not replayed; the client's next attempt replays them", err)
			}
		}
		// The record keeps Replay until the session is established
		// (established): a CONNECT the auth hook refuses after this claim
		// leaves the replay point for the next attempt.
	}
	return nil
}

// beforeReplay, set by tests only (export_test.go), runs between a
// CONNECT's claim of a session record and its replay, with the node's
// name: a test cuts the node off there.
var beforeReplay atomic.Pointer[func(node string)]

// replayDue reports whether cl's CONNECT resumes a persistent session this
// node does not hold (another node's, or this node's from before a
// restart or a refused CONNECT) and must replay the stream for it, from
// when (before replayMargin), and from when the session's offline quota
// counts what it replays (countFrom; what came before may have reached
// the client already, and must not take the place of newer messages).
func (s *sessions) replayDue(cl *mqtt.Client, pk packets.Packet, prev *record) (due bool, from, countFrom time.Time) {
	if pk.Connect.Clean || prev == nil || !prev.Persistent || len(prev.Subs) == 0 {
		return false, time.Time{}, time.Time{}
	}
	if prev.Node == s.r.cfg.Node && !prev.Replay {
		if cur, ok := s.r.srv.Clients.Get(cl.ID); ok && s.trusted(cur, prev) {
			return false, time.Time{}, time.Time{} // mochi holds it here: nothing was missed
		}
	}
	from, countFrom = prev.ReplayFrom, prev.ReplayFrom
	switch {
	case prev.Replay && prev.CountFrom.After(from):
		countFrom = prev.CountFrom // a replay an earlier CONNECT claimed and did not do
	case !prev.Replay && (prev.Online || from.IsZero()):
		// Taken over while online (or its disconnect not yet in the
		// record): what the old node had not yet had acknowledged is
		// recent. Those 30 s are replayed (the newest of them up to the
		// quota) but not counted: the client had most of them already.
		now := time.Now()
		from, countFrom = now.Add(-onlineReplay), now
	}
	return true, from.UTC(), countFrom.UTC()
}

// connectBudget is how long cl's CONNECT may still take for a replay:
// until the connection's handshake+CONNECT deadline (broker's listener),
// less what the refusal needs (refuseWrite and the CONNACK); at most
// replayTimeout.
func connectBudget(cl *mqtt.Client) time.Duration {
	d, ok := cl.Net.Conn.(interface{ ConnectDeadline() time.Time })
	if !ok || d.ConnectDeadline().IsZero() {
		return replayTimeout
	}
	return min(replayTimeout, time.Until(d.ConnectDeadline())-refuseWrite-time.Second)
}

// refuse refuses cl's CONNECT with server unavailable (MQTT 5 0x88, 3.1.1
// 0x03) and logs why (rate-limited).
func (s *sessions) refuse(cl *mqtt.Client, why string, err error) error {
	if s.refusals.allow() {
		s.r.log.Warn("CONNECT refused: "+why, "client", cl.ID, "err", err)
	}
	_ = s.r.srv.SendConnack(cl, packets.ErrServerUnavailable, false, nil)
	return packets.ErrServerUnavailable
}

// unresume undoes resume after a failed replay: the session is not held
// here, its record keeps the replay point (Replay), so the next CONNECT
// resumes it again, here or on another node.
func (s *sessions) unresume(cl, old *mqtt.Client) {
	// Best effort, briefly (the CONNACK must go out before the connection's
	// deadline): if the record stays online, the next CONNECT still sees
	// Replay and its point.
	s.updateWithin(cl, refuseWrite, func(r *record) bool { r.Online, r.Since, r.Will = false, time.Now().UTC(), nil; return false })
	srv := s.r.srv
	if cur, ok := srv.Clients.Get(cl.ID); ok && cur == old {
		srv.Clients.Delete(cl.ID)
	}
	srv.UnsubscribeClient(old)
	old.ClearInflights()
	s.r.setSubjects(cl.ID, nil)
	s.mu.Lock()
	if l := s.local[cl.ID]; l != nil && l.cl == cl {
		delete(s.local, cl.ID)
	}
	s.mu.Unlock()
	s.forget(cl)
}

// resume puts the session of another node in place as an offline client
// holding its subscriptions: mochi's takeover then finds it and answers
// session present. It returns that client (nil if the session is here
// already).
//
// An offline session of the same ID already here is a leftover: this node
// held it once, and another node has since (the record names it, or a
// replay is due), but this node missed the claim that would have evicted
// it (it was cut off, paused or down at the time; a restart restores it
// from the local store). It was still subscribed, so it may hold old
// messages up to its quota and not the newer ones: taking it over instead
// of replaying lost every message past its quota (the chaos scenario's
// lost backend messages, 2026-12-07). It is dropped, and the session
// resumed from the record.
func (s *sessions) resume(cl *mqtt.Client, prev *record) *mqtt.Client {
	s.dropMu.Lock()
	defer s.dropMu.Unlock()
	srv := s.r.srv
	if cur, ok := srv.Clients.Get(cl.ID); ok {
		if !cur.Closed() || (prev.Node == s.r.cfg.Node && s.trusted(cur, prev)) {
			// Live here, or this node's own (a replay due after a
			// refused CONNECT): mochi takes it over.
			return nil
		}
		s.r.log.Info("leftover offline session dropped: resuming the session from the cluster", "client", cl.ID,
			"owner", prev.Node, "queued_here", cur.State.Inflight.Len())
		s.drop(cur)
	}
	old := srv.NewClient(nil, "cluster", cl.ID, false)
	old.Properties.ProtocolVersion = prev.Version
	old.Properties.Props.SessionExpiryInterval = prev.Expiry
	old.Properties.Props.SessionExpiryIntervalFlag = prev.Expiry > 0
	old.Stop(packets.ErrSessionTakenOver)
	for _, sb := range prev.Subs {
		ps := packets.Subscription{Filter: sb.Filter, Qos: sb.Qos, NoLocal: sb.NoLocal, RetainAsPublished: sb.RAP,
			RetainHandling: sb.Handling, Identifier: sb.ID}
		srv.Topics.Subscribe(cl.ID, ps)
		old.State.Subscriptions.Add(sb.Filter, ps)
	}
	srv.Clients.Add(old)
	return old
}

// update rewrites cl's record with fn if cl's connection still owns it.
// It returns the error of a write that failed (nil also when cl does not
// own the record any more).
func (s *sessions) update(cl *mqtt.Client, fn func(*record) (del bool)) error {
	return s.updateWithin(cl, s.r.cfg.AckTimeout, fn)
}

// updateWithin is update bounded by d.
func (s *sessions) updateWithin(cl *mqtt.Client, d time.Duration, fn func(*record) (del bool)) error {
	s.mu.Lock()
	l := s.local[cl.ID]
	s.mu.Unlock()
	if l == nil || l.cl != cl || s.kv == nil {
		return nil
	}
	key := sessionKey(cl.ID)
	ctx, cancel := s.r.opCtxWithin(d)
	defer cancel()
	for attempt := 0; ; attempt++ {
		e, err := s.kv.Get(ctx, key)
		if err != nil {
			s.r.unwritten(cl.ID, "session record (not read)", err)
			return err
		}
		var rec record
		if json.Unmarshal(e.Value(), &rec) != nil || rec.Conn != l.conn {
			return nil // another connection owns it now
		}
		if fn(&rec) {
			err = s.kv.Delete(ctx, key, jetstream.LastRevision(e.Revision()))
		} else {
			b, _ := json.Marshal(rec)
			_, err = s.kv.Update(ctx, key, b, e.Revision())
		}
		if err == nil || !casConflict(err) || attempt >= casRetries || !casBackoff(ctx, attempt) {
			if err != nil && !s.r.unwritten(cl.ID, "session record", err) {
				s.r.log.Warn("session record not updated", "client", cl.ID, "err", err)
			}
			return err
		}
	}
}

// subscribed records cl's subscriptions (before its SUBACK/UNSUBACK).
func (s *sessions) subscribed(cl *mqtt.Client) error {
	return s.update(cl, func(r *record) bool { r.Subs = subsOf(cl); return false })
}

func (s *sessions) established(cl *mqtt.Client, _ packets.Packet) {
	s.mu.Lock()
	delete(s.restored, cl.ID) // taken over (a restored session with no record)
	s.mu.Unlock()
	s.update(cl, func(r *record) bool { r.Subs, r.Replay = subsOf(cl), false; return false })
}

// willPending: cl's delayed will waits to be sent.
func willPending(cl *mqtt.Client) bool {
	return atomic.LoadUint32(&cl.Properties.Will.Flag) == 1 && cl.Properties.Will.WillDelayInterval > 0
}

// disconnected marks the record offline (persistent) or deletes it.
func (s *sessions) disconnected(cl *mqtt.Client, _ error, expire bool) {
	if !willPending(cl) {
		defer s.forget(cl)
	}
	s.update(cl, func(r *record) bool {
		// The broker sent the will (claimed through OnWill, which took it
		// out of the record), or dropped it at a normal DISCONNECT; a
		// delayed will waits, in the record too (wills.go).
		r.Online, r.Since, r.Subs = false, time.Now().UTC(), subsOf(cl)
		if !willPending(cl) {
			r.Will = nil
		}
		if !r.Replay || r.ReplayFrom.IsZero() {
			r.ReplayFrom = r.Since
		} // else the replay the claim asked for was not done: keep its point
		if t, behind := s.r.q1.appliedUntil(); behind && t.Before(r.ReplayFrom) {
			r.ReplayFrom = t.UTC() // the node's feed had not applied what came after
		}
		for _, pk := range cl.State.Inflight.GetAll(false) {
			if c := time.Unix(pk.Created, 0); pk.FixedHeader.Type == packets.Publish && pk.Created > 0 && c.Before(r.ReplayFrom) {
				r.ReplayFrom = c.UTC()
			}
		}
		return expire
	})
	if expire {
		s.mu.Lock()
		if l := s.local[cl.ID]; l != nil && l.cl == cl {
			delete(s.local, cl.ID)
		}
		s.mu.Unlock()
	}
}
