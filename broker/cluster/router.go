// Package cluster is the MQTT broker across the nodes of a fleetgate
// cluster (docs/cluster.md, "Broker across nodes"). Each node's broker
// (mochi, broker/) serves its own connections; a Router, added to it as a
// hook (broker.Config.Hooks), carries messages between the nodes over NATS:
//
//   - every authorised publish is sent on a NATS subject that encodes its
//     topic (codec.go): QoS 0 on core NATS, QoS 1/2 published into the
//     JetStream stream fg_Q1 (R3), which captures the subject; the PUBACK
//     is sent only after JetStream acknowledged the replicated write, so a
//     node without quorum sends no PUBACK;
//   - QoS 0: each node holds one core NATS subscription per distinct
//     subject of the filters its sessions use, reference counted (never one
//     per client); QoS 1/2: one ordered JetStream consumer per node reads
//     the whole stream (q1feed.go; never a consumer per subscription or per
//     client), resuming from the last sequence it applied, so an online
//     subscriber misses nothing the stream stored; what arrives is
//     de-duplicated (overlapping filters) and injected into the local
//     broker through an inline client, so mochi matches it and delivers it
//     through the normal path: each subscriber's ACL and state check
//     (broker/auth) included, and offline persistent sessions on this node
//     queue it;
//   - sessions (sessions.go): a record per client ID in the KV bucket
//     fg_sessions, claimed by compare-and-swap; a takeover from another
//     node makes the old owner close its connection with 0x8E.
package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"hash/fnv"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/fleetgate/fleetgate/broker"
)

// Subjects and the stream.
const (
	// SubjectPrefix starts every routed message's subject:
	// fg.m.<0|1>.<encoded topic>.
	SubjectPrefix = "fg.m"
	// Stream holds QoS 1/2 messages (subjects fg.m.1.>), R3.
	Stream = "fg_Q1"
)

// Headers of a routed message.
const (
	hNode   = "Fg-Node"   // the node that routed it (its own copy is dropped)
	hID     = "Fg-Id"     // unique: a node receiving it twice delivers it once
	hOrigin = "Fg-Origin" // the publisher's client ID (No Local, retained attribution)
	hQoS    = "Fg-Qos"    // 2 for QoS 2 (the subject says 0 or 1)
	hProps  = "Fg-Props"  // MQTT 5 properties, JSON (props)
	hExpiry = "Fg-Expiry" // unix seconds when the message expires
)

// routeClientID is the inline client through which routed messages enter
// the local broker.
const routeClientID = "fleetgate-cluster-route"

// Config of a Router.
type Config struct {
	NC *nats.Conn
	// Node is this node's name (unique in the cluster).
	Node   string
	Logger *slog.Logger
	// AckTimeout bounds the wait for JetStream's acknowledgement of a
	// QoS 1/2 message (default 5 s); without it, no PUBACK.
	AckTimeout time.Duration
	// MaxAge is how long the stream keeps QoS 1/2 messages for offline
	// sessions (default 7 days, the broker's longest session expiry).
	MaxAge time.Duration
	// Workers deliver routed messages in parallel, each topic always by
	// the same worker (order per topic kept); default 4.
	Workers int
	// Stale, if set, is how old this node's proven view of revocations is
	// (0 before the view was first proven: nothing is connected then).
	// While it is older than StaleCloseAfter the node closes its sessions
	// (stale.go).
	Stale           func() time.Duration
	StaleCloseAfter time.Duration
}

// Router is one node's share of the broker across nodes; see the package
// comment.
type Router struct {
	mqtt.HookBase
	cfg   Config
	log   *slog.Logger
	js    jetstream.JetStream
	ready atomic.Bool // the stream and buckets are open

	srv   *mqtt.Server
	route *mqtt.Client
	b     *broker.Broker

	mu       sync.Mutex
	subjects map[string]*natsSub            // subject → subscription and count
	clients  map[string]map[string]struct{} // client ID → its subjects

	in      chan *nats.Msg
	workers []chan *nats.Msg
	dedup   dedup
	stop    chan struct{}
	wg      sync.WaitGroup
	once    sync.Once

	sess *sessions
	down shutdownState // shutdown.go

	retainedKV jetstream.KeyValue
	// q1 is the node's consumer of fg_Q1 (q1feed.go); q1Start the
	// stream's last sequence when the node opened it.
	q1      q1Feed
	q1Start uint64
	// pause is held for reading by each delivery of a routed message, and
	// for writing while a replay puts a resumed session's messages in order.
	pause sync.RWMutex

	// Routed counts messages sent to and received from other nodes.
	Routed, Received atomic.Int64
	// StaleClosed counts sessions closed past the second staleness bound.
	StaleClosed atomic.Int64
	// RevokedDropped counts routed messages of revoked devices dropped;
	// revokedLog rate-limits their log line.
	RevokedDropped atomic.Int64
	revokedLog     limiter
}

type natsSub struct {
	sub *nats.Subscription
	n   int
}

// New returns a Router; add it to the broker (broker.Config.Hooks), Bind it
// to the broker, then Run it.
func New(cfg Config) (*Router, error) {
	if cfg.NC == nil || cfg.Node == "" {
		return nil, errors.New("broker/cluster: a NATS connection and the node name are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = 7 * 24 * time.Hour
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 4
	}
	js, err := jetstream.New(cfg.NC)
	if err != nil {
		return nil, err
	}
	r := &Router{cfg: cfg, log: cfg.Logger.With("component", "broker-cluster", "node", cfg.Node), js: js,
		subjects: map[string]*natsSub{}, clients: map[string]map[string]struct{}{},
		in: make(chan *nats.Msg, 1<<16), stop: make(chan struct{})}
	r.sess = newSessions(r)
	return r, nil
}

// ID implements mqtt.Hook.
func (r *Router) ID() string { return "fleetgate-cluster" }

// Provides implements mqtt.Hook.
func (r *Router) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnConnect, mqtt.OnPublish, mqtt.OnWill, mqtt.OnWillSent, mqtt.OnSubscribed, mqtt.OnUnsubscribed, mqtt.OnSessionEstablish,
		mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnClientExpired}, []byte{b})
}

// Bind connects the router to its broker (after broker.New) and starts
// its delivery workers.
func (r *Router) Bind(b *broker.Broker) {
	r.b = b
	r.srv = b.MQTT()
	r.route = r.srv.NewClient(nil, "local", routeClientID, true)
	r.workers = make([]chan *nats.Msg, r.cfg.Workers)
	for i := range r.workers {
		r.workers[i] = make(chan *nats.Msg, 4096)
		r.wg.Add(1)
		go r.work(r.workers[i])
	}
	r.wg.Add(1)
	go r.read()
}

// Ready reports whether the stream and buckets are open (before, QoS 1/2
// publishes get no PUBACK and CONNECTs are refused).
func (r *Router) Ready() bool { return r.ready.Load() }

// Run opens the stream and buckets (retrying while the NATS cluster forms),
// then serves session takeovers until ctx ends.
func (r *Router) Run(ctx context.Context) error {
	defer r.close()
	r.wg.Add(1)
	go func() { defer r.wg.Done(); r.staleLoop(ctx) }()
	for {
		err := r.open(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		r.log.Warn("waiting for the NATS cluster to open the broker's stream and buckets", "err", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
	r.sess.takeOverRestored(ctx) // restart.go
	r.wg.Add(2)
	go func() { defer r.wg.Done(); r.runQ1(ctx, r.q1Start) }()
	go func() { defer r.wg.Done(); r.watchLag(ctx) }()
	r.ready.Store(true)
	r.log.Info("broker across nodes ready", "stream", Stream)
	return r.sess.run(ctx)
}

func (r *Router) open(ctx context.Context) error {
	octx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := r.js.CreateOrUpdateStream(octx, jetstream.StreamConfig{Name: Stream, Subjects: []string{SubjectPrefix + ".1.>"},
		Replicas: 3, Storage: jetstream.FileStorage, MaxAge: r.cfg.MaxAge, Discard: jetstream.DiscardOld})
	if err != nil {
		return err
	}
	r.q1Start = st.CachedInfo().State.LastSeq
	if err := r.openRetained(octx); err != nil {
		return err
	}
	return r.sess.open(octx)
}

func (r *Router) close() {
	r.once.Do(func() {
		close(r.stop)
		r.mu.Lock()
		for s, e := range r.subjects {
			_ = e.sub.Unsubscribe()
			delete(r.subjects, s)
		}
		r.mu.Unlock()
		r.wg.Wait()
	})
}

// props are the MQTT 5 properties a routed message keeps.
type props struct {
	PayloadFormat   *byte                  `json:"pf,omitempty"`
	ContentType     string                 `json:"ct,omitempty"`
	ResponseTopic   string                 `json:"rt,omitempty"`
	CorrelationData []byte                 `json:"cd,omitempty"`
	User            []packets.UserProperty `json:"u,omitempty"`
}

// message is the NATS message that carries pk to the other nodes.
func (r *Router) message(pk packets.Packet, origin string) *nats.Msg {
	q := "0"
	if pk.FixedHeader.Qos > 0 {
		q = "1"
	}
	m := nats.NewMsg(SubjectPrefix + "." + q + "." + EncodeTopic(pk.TopicName))
	m.Data = pk.Payload
	m.Header.Set(hNode, r.cfg.Node)
	m.Header.Set(hID, nuid.Next())
	m.Header.Set(hOrigin, origin)
	if pk.FixedHeader.Qos == 2 {
		m.Header.Set(hQoS, "2")
	}
	if pk.Expiry > 0 {
		m.Header.Set(hExpiry, strconv.FormatInt(pk.Expiry, 10))
	}
	p := props{ContentType: pk.Properties.ContentType, ResponseTopic: pk.Properties.ResponseTopic,
		CorrelationData: pk.Properties.CorrelationData, User: pk.Properties.User}
	if pk.Properties.PayloadFormatFlag {
		pf := pk.Properties.PayloadFormat
		p.PayloadFormat = &pf
	}
	if p.PayloadFormat != nil || p.ContentType != "" || p.ResponseTopic != "" || p.CorrelationData != nil || len(p.User) > 0 {
		if b, err := json.Marshal(p); err == nil {
			m.Header.Set(hProps, string(b))
		}
	}
	return m
}

// OnPublish implements mqtt.Hook: every publish the broker accepted (its
// ACL check passed) goes to the other nodes. A QoS 1/2 message must be
// acknowledged by JetStream (stored on a majority) before mochi may send
// its PUBACK: otherwise the packet is dropped unacknowledged, and the
// client sends it again.
func (r *Router) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl == r.route || (cl.Net.Inline && cl.ID == broker.FanoutClientID) {
		return pk, nil // routed here, or the fan-out copy of a message already routed
	}
	origin := pk.Origin
	if origin == "" {
		origin = cl.ID
	}
	if pk.FixedHeader.Retain {
		// The retained store of every node: written before the PUBACK.
		ctx, cancel := r.opCtx()
		err := r.retain(ctx, pk, origin)
		cancel()
		if err != nil {
			r.log.Warn("retained message not stored in the cluster", "client", cl.ID, "topic", pk.TopicName, "err", err)
			if pk.FixedHeader.Qos > 0 {
				return pk, packets.ErrRejectPacket
			}
		}
	}
	m := r.message(pk, origin)
	if pk.FixedHeader.Qos == 0 {
		if err := r.cfg.NC.PublishMsg(m); err != nil {
			r.log.Debug("QoS 0 message not routed", "topic", pk.TopicName, "err", err)
		}
		r.Routed.Add(1)
		return pk, nil
	}
	if !r.ready.Load() {
		r.log.Warn("QoS 1/2 message not acknowledged: the cluster's stream is not open", "client", cl.ID, "topic", pk.TopicName)
		return pk, packets.ErrRejectPacket
	}
	ctx, cancel := r.opCtx()
	defer cancel()
	if _, err := r.js.PublishMsg(ctx, m); err != nil {
		r.log.Warn("QoS 1/2 message not acknowledged by JetStream (no quorum?): no PUBACK", "client", cl.ID,
			"topic", pk.TopicName, "err", err)
		return pk, packets.ErrRejectPacket
	}
	r.Routed.Add(1)
	return pk, nil
}

// OnWill implements mqtt.Hook: the will goes out only if this node claims
// it in the session record (wills.go); otherwise it is dropped.
func (r *Router) OnWill(cl *mqtt.Client, w mqtt.Will) (mqtt.Will, error) {
	return r.sess.onWill(cl, w), nil
}

// OnWillSent implements mqtt.Hook: a will this node published (its
// client's connection ended) goes to the other nodes as well.
func (r *Router) OnWillSent(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	if _, err := r.OnPublish(cl, pk); err != nil {
		if pk.FixedHeader.Qos > 0 && r.ready.Load() {
			ctx, cancel := r.opCtx()
			r.publishWill(ctx, r.message(pk, cl.ID), cl.ID)
			cancel()
			return
		}
		r.log.Warn("will not routed to the other nodes", "client", cl.ID, "topic", pk.TopicName, "err", err)
	}
}

// read takes every routed message (all subscriptions share one channel,
// in the order the connection received them), drops this node's own and
// copies already seen (a message matching two subscriptions arrives
// twice), and hands it to the worker of its subject.
func (r *Router) read() {
	defer r.wg.Done()
	for {
		select {
		case <-r.stop:
			for _, w := range r.workers {
				close(w)
			}
			return
		case m := <-r.in:
			if m.Header.Get(hNode) == r.cfg.Node || !r.dedup.first(m.Header.Get(hID)) {
				continue
			}
			h := fnv.New32a()
			_, _ = h.Write([]byte(m.Subject))
			r.workers[h.Sum32()%uint32(len(r.workers))] <- m
		}
	}
}

func (r *Router) work(ch chan *nats.Msg) {
	defer r.wg.Done()
	for m := range ch {
		r.deliver(m)
	}
}

// deliver injects a routed message into the local broker: mochi matches
// it against the local subscriptions and delivers it to each subscriber
// that passes its ACL and state check.
func (r *Router) deliver(m *nats.Msg) {
	pk, ok := r.packet(m)
	if !ok || r.revokedOrigin(pk) {
		return
	}
	r.Received.Add(1)
	r.pause.RLock()
	defer r.pause.RUnlock()
	if err := r.srv.InjectPacket(r.route, pk); err != nil {
		r.log.Warn("routed message not delivered", "topic", pk.TopicName, "err", err)
	}
}

// revokedOrigin reports (and counts, and logs rate-limited) a routed
// message whose publisher is a device revoked here (broker.OriginRevoked):
// it is not delivered, live or replayed.
func (r *Router) revokedOrigin(pk packets.Packet) bool {
	if !r.b.OriginRevoked(pk.Origin) {
		return false
	}
	r.RevokedDropped.Add(1)
	if r.revokedLog.allow() {
		r.log.Warn("routed message of a revoked device dropped", "device", pk.Origin, "topic", pk.TopicName)
	}
	return true
}

// packet is the MQTT publish a routed message carries; ok is false for a
// subject the codec could not have written, or an expired message.
func (r *Router) packet(m *nats.Msg) (packets.Packet, bool) {
	rest, ok := strings.CutPrefix(m.Subject, SubjectPrefix+".")
	if !ok || len(rest) < 3 {
		return packets.Packet{}, false
	}
	qos := byte(0)
	if rest[0] == '1' {
		qos = 1
		if m.Header.Get(hQoS) == "2" {
			qos = 2
		}
	}
	topic, ok := DecodeTopic(rest[2:])
	if !ok {
		r.log.Warn("routed message with an undecodable subject dropped", "subject", m.Subject)
		return packets.Packet{}, false
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}, TopicName: topic,
		Payload: m.Data, Origin: m.Header.Get(hOrigin)}
	if qos > 0 {
		pk.PacketID = 1 // not used for an inline client's publish, but validated
	}
	if e := m.Header.Get(hExpiry); e != "" {
		exp, _ := strconv.ParseInt(e, 10, 64)
		left := exp - time.Now().Unix()
		if left <= 0 {
			return packets.Packet{}, false
		}
		pk.Properties.MessageExpiryInterval = uint32(left)
		pk.Expiry = exp
	}
	if p := m.Header.Get(hProps); p != "" {
		var pr props
		if json.Unmarshal([]byte(p), &pr) == nil {
			pk.Properties.ContentType, pk.Properties.ResponseTopic = pr.ContentType, pr.ResponseTopic
			pk.Properties.CorrelationData, pk.Properties.User = pr.CorrelationData, pr.User
			if pr.PayloadFormat != nil {
				pk.Properties.PayloadFormat, pk.Properties.PayloadFormatFlag = *pr.PayloadFormat, true
			}
		}
	}
	return pk, true
}

// Reference-counted subscriptions.

// subjectsOf returns the core NATS subjects that bring the QoS 0 messages
// of cl's filters here (QoS 1/2 come from the node's consumer, q1feed.go).
func subjectsOf(cl *mqtt.Client) map[string]struct{} {
	out := map[string]struct{}{}
	for f := range cl.State.Subscriptions.GetAll() {
		for _, s := range EncodeFilter(f) {
			out[SubjectPrefix+".0."+s] = struct{}{}
		}
	}
	return out
}

// setSubjects makes id's share of the node's NATS subscriptions want.
func (r *Router) setSubjects(id string, want map[string]struct{}) {
	added := false
	r.mu.Lock()
	select {
	case <-r.stop:
		r.mu.Unlock()
		return
	default:
	}
	old := r.clients[id]
	for s := range want {
		if _, ok := old[s]; ok {
			continue
		}
		e := r.subjects[s]
		if e == nil {
			sub, err := r.cfg.NC.ChanSubscribe(s, r.in)
			if err != nil {
				r.log.Warn("NATS subscription failed", "subject", s, "err", err)
				delete(want, s)
				continue
			}
			_ = sub.SetPendingLimits(-1, -1)
			e = &natsSub{sub: sub}
			r.subjects[s] = e
			added = true
		}
		e.n++
	}
	for s := range old {
		if _, ok := want[s]; ok {
			continue
		}
		if e := r.subjects[s]; e != nil {
			if e.n--; e.n <= 0 {
				_ = e.sub.Unsubscribe()
				delete(r.subjects, s)
			}
		}
	}
	if len(want) == 0 {
		delete(r.clients, id)
	} else {
		r.clients[id] = want
	}
	r.mu.Unlock()
	if added {
		// The local NATS server has the interest before the SUBACK.
		_ = r.cfg.NC.FlushTimeout(2 * time.Second)
	}
}

// Subscriptions returns the number of NATS subscriptions this node holds
// for its sessions' filters.
func (r *Router) Subscriptions() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.subjects)
}

// OnSubscribed implements mqtt.Hook. A persistent session's subscription
// is granted only once its record holds it: a session resumed on another
// node (its node dead) gets its subscriptions from the record, and one
// granted here but missing there was lost with the node, the client told
// "session present" and never subscribing again. So when the record
// cannot be written (no quorum), the filters this SUBSCRIBE granted are
// taken out again and the SUBACK says 0x80 (unspecified error) for each:
// the client subscribes again later. (mochi writes the SUBACK with the
// reason codes hooks see here, and skips retained messages for a filter
// that failed.)
func (r *Router) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if cl.Net.Inline {
		return
	}
	r.setSubjects(cl.ID, subjectsOf(cl))
	err := r.sess.subscribed(cl)
	if err == nil || !persistent(cl) {
		return
	}
	n := 0
	for i, f := range pk.Filters {
		if i >= len(codes) || codes[i] >= packets.ErrUnspecifiedError.Code {
			continue
		}
		codes[i] = packets.ErrUnspecifiedError.Code
		if r.srv.Topics.Unsubscribe(f.Filter, cl.ID) {
			atomic.AddInt64(&r.srv.Info.Subscriptions, -1)
		}
		cl.State.Subscriptions.Delete(f.Filter)
		n++
	}
	r.setSubjects(cl.ID, subjectsOf(cl))
	if n > 0 && r.sess.refusals.allow() {
		r.log.Warn("SUBSCRIBE refused (0x80): the session record does not hold it (no quorum?)", "client", cl.ID, "filters", n, "err", err)
	}
}

// OnUnsubscribed implements mqtt.Hook. A session taken over on this node
// hands its subscriptions to the new connection (same client ID): nothing
// to change.
func (r *Router) OnUnsubscribed(cl *mqtt.Client, _ packets.Packet) {
	if !cl.Net.Inline && !cl.IsTakenOver() {
		r.setSubjects(cl.ID, subjectsOf(cl))
		r.sess.subscribed(cl)
	}
}

// OnConnect implements mqtt.Hook: the session record is claimed for this
// node (sessions.go); without it the CONNECT is refused.
func (r *Router) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	return r.sess.connect(cl, pk)
}

// OnSessionEstablished implements mqtt.Hook: the connection now holds the
// session's subscriptions (resumed, restored, or none on a clean start).
func (r *Router) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	if cl.Net.Inline {
		return
	}
	r.setSubjects(cl.ID, subjectsOf(cl))
	r.sess.established(cl, pk)
}

// OnDisconnect implements mqtt.Hook. A persistent session keeps its
// subscriptions while it is offline on this node: routed QoS 1/2 messages
// are queued for it as for a local publish.
func (r *Router) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if cl.Net.Inline {
		return
	}
	if cl.IsTakenOver() {
		r.sess.forget(cl) // its will went through OnWill (mochi cancels a delayed one)
		return
	}
	if expire {
		r.setSubjects(cl.ID, nil)
	}
	r.sess.disconnected(cl, err, expire)
}

// OnClientExpired implements mqtt.Hook.
func (r *Router) OnClientExpired(cl *mqtt.Client) {
	r.sess.forget(cl)
	if cur, ok := r.srv.Clients.Get(cl.ID); !ok || cur == cl {
		r.setSubjects(cl.ID, nil)
	}
}

// Seed takes the subscriptions of sessions the broker restored from its
// own store at start.
func (r *Router) Seed() {
	for id, cl := range r.srv.Clients.GetAll() {
		if !cl.Net.Inline {
			r.setSubjects(id, subjectsOf(cl))
		}
	}
}

// dedup remembers the IDs of recent routed messages (two generations of
// up to dedupGen each).
type dedup struct {
	mu        sync.Mutex
	cur, prev map[string]struct{}
}

const dedupGen = 1 << 15

func (d *dedup) first(id string) bool {
	if id == "" {
		return true
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.cur[id]; ok {
		return false
	}
	if _, ok := d.prev[id]; ok {
		return false
	}
	if d.cur == nil || len(d.cur) >= dedupGen {
		d.prev, d.cur = d.cur, make(map[string]struct{}, 1024)
	}
	d.cur[id] = struct{}{}
	return true
}
