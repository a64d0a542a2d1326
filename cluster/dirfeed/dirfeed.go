// Package dirfeed feeds each cluster node's directory (the in-memory view
// of certificates and devices that the broker and the APIs check) from a
// JetStream KV bucket, and publishes the node's own registry changes into
// it. Records are current values (key c.<serial>: api.FeedCert, key
// d.<device>: api.FeedDevice), so applying one twice or late is harmless,
// and a revocation is terminal on both sides: the bucket never goes back
// from revoked (Publish merges), and neither does a directory
// (directory.ApplyFeed).
//
// Two paths bring the bucket's changes, because one alone is not enough:
//   - a core NATS subscription on the bucket's subjects delivers each write
//     as it is published, also in the seconds after a NATS server died
//     (a watch served by that server is silent until nats.go's idle
//     heartbeats notice, 10 s). It applies only what restricts (a
//     revocation, a suspension): it has no revision to order by;
//   - an ordered watch, resumed from the last applied revision after a
//     reconnect or a stall, applies everything in revision order, with no
//     gap.
//
// Freshness is proven, not assumed: every Heartbeat the node writes a key
// of its own (hb.<node>); JetStream acknowledges it only once a majority
// stored it, and once the watch has applied that revision, the view holds
// everything written before the heartbeat was sent. While the last such
// proof is older than StaleAfter, Check fails: the directory's gate
// (directory.SetGate) then refuses every certificate and /readyz answers
// 503 (fail closed). A node on the minority side of a partition cannot get
// a heartbeat acknowledged, so it goes stale within the bound.
package dirfeed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
)

// Bucket is the KV bucket of the cluster's directory.
const Bucket = "fleetgate_dir"

// Config of a Feed.
type Config struct {
	NC *nats.Conn
	KV jetstream.KeyValue // the bucket (natsnode.Bucket(Bucket))
	// Store is the same bucket as a kvtx store: publication reads from the
	// stream's leader and writes by compare-and-swap.
	Store kvtx.Store
	Dir   *directory.Directory
	// Node names this node (a KV key token: [a-z0-9-]).
	Node string
	// StaleAfter bounds how old the proven view may be (default 1 s).
	StaleAfter time.Duration
	// Heartbeat is how often freshness is proven (default StaleAfter/4).
	Heartbeat time.Duration
	Logger    *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// OnDevice, if set, is told of each device record the watch applied,
	// on a goroutine of its own, the latest state per device (the node
	// that holds a device's records brings them to what another node
	// decided: registry.ApplyClusterState).
	OnDevice func(id string, state fleet.DeviceState)
}

// Feed is one node's follower of the bucket and publisher into it.
type Feed struct {
	cfg Config
	log *slog.Logger

	applyMu sync.Mutex           // one apply at a time
	seenMu  sync.Mutex           // guards seen
	seen    map[string]seenValue // key → the value last applied from or written to the bucket
	applied atomic.Uint64        // revision the watch applied last

	hbMu    sync.Mutex
	hbs     []heartbeat  // acknowledged, not yet applied
	freshAt atomic.Int64 // unix ns: send time of the newest applied heartbeat

	restart chan struct{}
	retryMu sync.Mutex
	retry   map[string]bool // keys whose publication failed
	synced  chan struct{}
	once    sync.Once

	devMu   sync.Mutex
	devs    map[string]fleet.DeviceState // for OnDevice, latest per device
	devKick chan struct{}
}

// seenValue is a record's value in the bucket at revision rev, as the
// watch applied it or a publication's commit (or read) confirmed it.
// live marks a value the live path saw published: a publication is not a
// commit (a write refused by JetStream or never acknowledged by a
// majority, a node's own among them, is delivered to subscribers all the
// same), so such a value is not known to be in the bucket.
type seenValue struct {
	val  string
	rev  uint64
	live bool
}

type heartbeat struct {
	rev  uint64
	sent time.Time
}

// New returns a feed; Run runs it, Publish is installed as a watcher of
// the directory by Run.
func New(cfg Config) *Feed {
	if cfg.StaleAfter <= 0 {
		cfg.StaleAfter = time.Second
	}
	if cfg.Heartbeat <= 0 {
		cfg.Heartbeat = cfg.StaleAfter / 4
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Feed{cfg: cfg, log: cfg.Logger, seen: map[string]seenValue{}, restart: make(chan struct{}, 1),
		retry: map[string]bool{}, synced: make(chan struct{}), devs: map[string]fleet.DeviceState{}, devKick: make(chan struct{}, 1)}
}

// ErrStale: the view is not proven fresh within the bound.
var ErrStale = errors.New("dirfeed: view of revocations is stale")

// Age is how old the proven view is (large before the first proof).
func (f *Feed) Age() time.Duration {
	at := f.freshAt.Load()
	if at == 0 {
		return time.Duration(1<<63 - 1)
	}
	return f.cfg.Now().Sub(time.Unix(0, at))
}

// Check fails while the view is older than StaleAfter: the directory's
// gate.
func (f *Feed) Check() error {
	if age := f.Age(); age > f.cfg.StaleAfter {
		if f.freshAt.Load() == 0 {
			return fmt.Errorf("%w: not synced yet", ErrStale)
		}
		return fmt.Errorf("%w: last proven %s ago (bound %s)", ErrStale, age.Round(time.Millisecond), f.cfg.StaleAfter)
	}
	return nil
}

// Fresh is Check as a readiness probe.
func (f *Feed) Fresh() bool { return f.Check() == nil }

// Synced is closed once the view was first proven fresh.
func (f *Feed) Synced() <-chan struct{} { return f.synced }

// Applied is the last revision the watch applied.
func (f *Feed) Applied() uint64 { return f.applied.Load() }

// Run follows the bucket and publishes the directory's changes until ctx
// ends. It installs the directory's gate and watcher.
func (f *Feed) Run(ctx context.Context) error {
	f.cfg.Dir.SetGate(f.Check)
	f.cfg.Dir.Watch(f.publishEvent)
	f.cfg.NC.SetReconnectHandler(func(c *nats.Conn) {
		f.log.Info("NATS reconnected; resuming the directory watch", "server", c.ConnectedUrlRedacted(), "from_revision", f.applied.Load()+1)
		f.kick()
	})
	sub, err := f.cfg.NC.Subscribe("$KV."+Bucket+".>", f.live)
	if err != nil {
		return fmt.Errorf("dirfeed: subscribe: %w", err)
	}
	defer sub.Unsubscribe()
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { defer wg.Done(); f.deviceLoop(ctx) }()
	go func() { defer wg.Done(); f.watchLoop(ctx) }()
	go func() { defer wg.Done(); f.heartbeatLoop(ctx) }()
	go func() { defer wg.Done(); f.retryLoop(ctx) }()
	wg.Wait()
	return nil
}

func (f *Feed) kick() {
	select {
	case f.restart <- struct{}{}:
	default:
	}
}

// ---- following ----

func (f *Feed) watchLoop(ctx context.Context) {
	for ctx.Err() == nil {
		var opts []jetstream.WatchOpt
		if a := f.applied.Load(); a > 0 {
			opts = append(opts, jetstream.ResumeFromRevision(a+1))
		}
		wctx, cancel := context.WithCancel(ctx)
		w, err := f.cfg.KV.WatchAll(wctx, opts...)
		if err != nil {
			cancel()
			f.log.Warn("directory watch", "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(f.cfg.Heartbeat):
			}
			continue
		}
		f.follow(ctx, w)
		w.Stop()
		cancel()
	}
}

// follow applies the watch's entries until ctx ends, a restart is asked
// for, or the watch stalls (an acknowledged heartbeat not seen within
// twice the bound).
func (f *Feed) follow(ctx context.Context, w jetstream.KeyWatcher) {
	tick := time.NewTicker(f.cfg.Heartbeat)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.restart:
			return
		case <-tick.C:
			if f.stalled() {
				f.log.Warn("directory watch stalled; resuming it", "from_revision", f.applied.Load()+1)
				return
			}
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				continue // initial values delivered
			}
			f.applyEntry(e)
		}
	}
}

func (f *Feed) stalled() bool {
	f.hbMu.Lock()
	defer f.hbMu.Unlock()
	return len(f.hbs) > 0 && f.cfg.Now().Sub(f.hbs[0].sent) > 2*f.cfg.StaleAfter
}

func (f *Feed) applyEntry(e jetstream.KeyValueEntry) {
	rev := e.Revision()
	if rev <= f.applied.Load() {
		return // delivered again after a resume
	}
	if e.Operation() == jetstream.KeyValuePut {
		if err := f.apply(e.Key(), e.Value(), rev, false); err != nil {
			f.log.Error("directory record refused", "key", e.Key(), "revision", rev, "err", err)
		} else if f.cfg.OnDevice != nil && strings.HasPrefix(e.Key(), "d.") {
			var d api.FeedDevice
			if json.Unmarshal(e.Value(), &d) == nil {
				f.devMu.Lock()
				f.devs[d.ID] = fleet.DeviceState(d.State)
				f.devMu.Unlock()
				select {
				case f.devKick <- struct{}{}:
				default:
				}
			}
		}
	}
	f.applied.Store(rev)
	f.hbMu.Lock()
	for len(f.hbs) > 0 && f.hbs[0].rev <= rev {
		if at := f.hbs[0].sent.UnixNano(); at > f.freshAt.Load() {
			f.freshAt.Store(at)
		}
		f.hbs = f.hbs[1:]
	}
	f.hbMu.Unlock()
	if f.freshAt.Load() != 0 {
		f.once.Do(func() { close(f.synced) })
	}
}

// deviceLoop tells OnDevice of the device records applied.
func (f *Feed) deviceLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-f.devKick:
		}
		f.devMu.Lock()
		devs := f.devs
		f.devs = map[string]fleet.DeviceState{}
		f.devMu.Unlock()
		for id, st := range devs {
			f.cfg.OnDevice(id, st)
		}
	}
}

// live applies what restricts, as soon as it is published.
func (f *Feed) live(m *nats.Msg) {
	if m.Header.Get("KV-Operation") != "" {
		return
	}
	key := strings.TrimPrefix(m.Subject, "$KV."+Bucket+".")
	if err := f.apply(key, m.Data, 0, true); err != nil {
		f.log.Warn("live directory record refused", "key", key, "err", err)
	}
}

// apply applies one record at rev (0: unknown; restrictOnly: only
// revocations and suspensions).
func (f *Feed) apply(key string, val []byte, rev uint64, restrictOnly bool) error {
	kind, _, ok := strings.Cut(key, ".")
	if !ok {
		return nil
	}
	var feed api.Feed
	switch kind {
	case "c":
		var c api.FeedCert
		if err := json.Unmarshal(val, &c); err != nil {
			return err
		}
		if restrictOnly && !c.Revoked {
			return nil
		}
		feed.Certs = []api.FeedCert{c}
	case "d":
		var d api.FeedDevice
		if err := json.Unmarshal(val, &d); err != nil {
			return err
		}
		if restrictOnly && d.State != string(fleet.StateRevoked) && d.State != string(fleet.StateSuspended) {
			return nil
		}
		feed.Devices = []api.FeedDevice{d}
	default:
		return nil // heartbeats
	}
	f.applyMu.Lock()
	defer f.applyMu.Unlock()
	if rev != 0 {
		f.markSeen(key, val, rev)
	} else {
		f.markLive(key, val)
	}
	// ApplyFeed tells the watchers, publishEvent among them, on this
	// goroutine: it finds the value seen and writes nothing back, or,
	// for a value only seen live, leaves its confirmation to retryLoop.
	return f.cfg.Dir.ApplyFeed(feed)
}

// ---- proving freshness ----

func (f *Feed) heartbeatLoop(ctx context.Context) {
	t := time.NewTicker(f.cfg.Heartbeat)
	defer t.Stop()
	key := "hb." + f.cfg.Node
	for {
		sent := f.cfg.Now()
		pctx, cancel := context.WithTimeout(ctx, f.cfg.StaleAfter)
		rev, err := f.cfg.KV.Put(pctx, key, []byte(sent.UTC().Format(time.RFC3339Nano)))
		cancel()
		if err == nil {
			f.hbMu.Lock()
			if rev <= f.applied.Load() { // the watch was faster than the answer
				if sent.UnixNano() > f.freshAt.Load() {
					f.freshAt.Store(sent.UnixNano())
				}
			} else {
				f.hbs = append(f.hbs, heartbeat{rev, sent})
			}
			f.hbMu.Unlock()
		} else if ctx.Err() == nil {
			f.log.Debug("heartbeat not acknowledged", "err", err, "stale", !f.Fresh())
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ---- publishing ----

// publishEvent is the directory's watcher: a change this node's registry
// made (not one applied from the bucket, whose value is already seen) is
// written to the bucket before the registry's call returns.
func (f *Feed) publishEvent(ev fleet.Event) {
	var keys []string
	if ev.Serial != "" {
		keys = append(keys, "c."+ev.Serial)
	}
	if ev.Kind == fleet.EventDeviceChanged && ev.DeviceID != "" {
		keys = append(keys, "d."+ev.DeviceID)
	}
	for _, k := range keys {
		if f.seenLive(k) {
			// Applied from the live path (on this goroutine, in apply):
			// the publication it saw may not have been committed, so
			// retryLoop confirms it, or commits it, without holding
			// up the feed.
			f.retryMu.Lock()
			f.retry[k] = true
			f.retryMu.Unlock()
			continue
		}
		if err := f.publish(k); err != nil {
			f.log.Error("directory change not replicated yet; retrying", "key", k, "err", err)
			f.retryMu.Lock()
			f.retry[k] = true
			f.retryMu.Unlock()
		}
	}
}

// record is the current value of key in the local directory.
func (f *Feed) record(key string) ([]byte, bool) {
	kind, id, _ := strings.Cut(key, ".")
	switch kind {
	case "c":
		c, ok := f.cfg.Dir.CertStatus(id)
		if !ok {
			return nil, false
		}
		b, _ := json.Marshal(api.FeedCert{Serial: id, Role: string(c.Identity.Role), Name: c.Identity.Name, NotAfter: c.NotAfter.UTC(), Revoked: c.Revoked})
		return b, true
	case "d":
		d, ok := f.cfg.Dir.DeviceStatus(id)
		if !ok {
			return nil, false
		}
		b, _ := json.Marshal(api.FeedDevice{ID: id, Group: d.Group, State: string(d.State), Tags: d.Tags})
		return b, true
	}
	return nil, false
}

// publish writes the local value of key into the bucket, merged with the
// bucket's: a revocation there stays (compare-and-swap on the revision, so
// a concurrent write of another node is merged, not overwritten).
func (f *Feed) publish(key string) error {
	val, ok := f.record(key)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return f.publishValue(ctx, key, val)
}

// PublishRecord writes val, a record as a registry committed it (key
// d.<device>: api.FeedDevice, c.<serial>: api.FeedCert), into the bucket,
// merged with the bucket's as publish does (a revocation there stays).
// The registry's outbox calls it after each commit, and for the commits
// of nodes that stopped before publishing (registry.Publisher).
func (f *Feed) PublishRecord(ctx context.Context, key string, val []byte) error {
	if kind, _, _ := strings.Cut(key, "."); kind != "c" && kind != "d" {
		return fmt.Errorf("dirfeed: %q is not a directory record", key)
	}
	return f.publishValue(ctx, key, val)
}

// publishValue writes val under key, merged with the bucket's value.
func (f *Feed) publishValue(ctx context.Context, key string, val []byte) error {
	f.seenMu.Lock()
	seen := f.seen[key]
	f.seenMu.Unlock()
	if seen.live {
		seen = seenValue{} // not known to be in the bucket: read it
	}
	if seen.rev != 0 && seen.val == string(val) {
		return nil
	}
	cur, rev := []byte(seen.val), seen.rev // one round trip when the bucket is where this node saw it last
	for range 10 {
		if rev == 0 {
			e, err := f.cfg.Store.Get(ctx, key)
			if err != nil && !errors.Is(err, kvtx.ErrNotFound) {
				return err
			}
			cur, rev = e.Value, e.Rev
		}
		next := val
		if cur != nil {
			var err error
			if next, err = merge(key, cur, val); err != nil {
				return err
			}
			if string(next) == string(cur) {
				f.markSeen(key, next, rev)
				return nil
			}
		}
		revs, err := f.cfg.Store.Commit(ctx, kvtx.Op{Key: key, Value: next, Expect: rev})
		if err == nil {
			f.markSeen(key, next, revs[0])
			return nil
		}
		if !errors.Is(err, kvtx.ErrRevision) {
			return err
		}
		rev = 0 // another node wrote it: read it again
	}
	return fmt.Errorf("dirfeed: %s: too many concurrent writers", key)
}

// markSeen records val as key's value in the bucket at rev (> 0).
func (f *Feed) markSeen(key string, val []byte, rev uint64) {
	f.seenMu.Lock()
	if prev := f.seen[key]; prev.live || rev >= prev.rev {
		f.seen[key] = seenValue{val: string(val), rev: rev}
	}
	f.seenMu.Unlock()
}

// markLive records val as published for key but not known to be
// committed: until the watch or a publication confirms a value, publish
// reads the bucket rather than trusting it.
func (f *Feed) markLive(key string, val []byte) {
	f.seenMu.Lock()
	if prev := f.seen[key]; prev.val != string(val) {
		f.seen[key] = seenValue{val: string(val), live: true}
	}
	f.seenMu.Unlock()
}

// seenLive: key's last seen value came from the live path only, and the
// local record is that value (it was applied from there).
func (f *Feed) seenLive(key string) bool {
	f.seenMu.Lock()
	seen := f.seen[key]
	f.seenMu.Unlock()
	if !seen.live {
		return false
	}
	val, ok := f.record(key)
	return ok && string(val) == seen.val
}

// merge is the bucket's rule: a revocation is terminal.
func merge(key string, old, new []byte) ([]byte, error) {
	switch key[0] {
	case 'c':
		var o, n api.FeedCert
		if json.Unmarshal(old, &o) == nil && o.Revoked {
			if err := json.Unmarshal(new, &n); err != nil {
				return nil, err
			}
			if !n.Revoked {
				n.Revoked = true
				return json.Marshal(n)
			}
		}
	case 'd':
		var o, n api.FeedDevice
		if json.Unmarshal(old, &o) == nil && o.State == string(fleet.StateRevoked) {
			if err := json.Unmarshal(new, &n); err != nil {
				return nil, err
			}
			if n.State != string(fleet.StateRevoked) {
				n.State = string(fleet.StateRevoked)
				return json.Marshal(n)
			}
		}
	}
	return new, nil
}

// retryLoop republishes what failed to publish, and, once synced, every
// local record the bucket lacks or holds differently (a change committed
// locally while the bucket was out of reach, or before a crash).
func (f *Feed) retryLoop(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-f.synced:
	}
	f.reconcile()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f.retryMu.Lock()
		keys := make([]string, 0, len(f.retry))
		for k := range f.retry {
			keys = append(keys, k)
		}
		f.retryMu.Unlock()
		for _, k := range keys {
			if err := f.publish(k); err == nil {
				f.retryMu.Lock()
				delete(f.retry, k)
				f.retryMu.Unlock()
				f.log.Info("directory change replicated", "key", k)
			}
		}
	}
}

// reconcile publishes what the bucket lacks: local records it does not
// hold, and local revocations it does not have. Any other difference is
// the bucket's later decision (another node's suspension or resumption),
// which this node follows (OnDevice), not overwrites.
func (f *Feed) reconcile() {
	_, _, certs, devices := f.cfg.Dir.Snapshot()
	keys := make([]string, 0, len(certs)+len(devices))
	for s := range certs {
		keys = append(keys, "c."+s)
	}
	for id := range devices {
		keys = append(keys, "d."+id)
	}
	n := 0
	for _, k := range keys {
		local, ok := f.record(k)
		if !ok {
			continue
		}
		f.seenMu.Lock()
		seen, had := f.seen[k]
		f.seenMu.Unlock()
		if had && !seen.live && !revokes(k, []byte(seen.val), local) {
			continue
		}
		n++
		if err := f.publish(k); err != nil {
			f.retryMu.Lock()
			f.retry[k] = true
			f.retryMu.Unlock()
		}
	}
	f.log.Debug("directory reconciled with the bucket", "certs", len(certs), "devices", len(devices), "published", n)
}

// revokes: local records a revocation that the bucket's value lacks.
func revokes(key string, bucket, local []byte) bool {
	switch key[0] {
	case 'c':
		var b, l api.FeedCert
		return json.Unmarshal(bucket, &b) == nil && json.Unmarshal(local, &l) == nil && l.Revoked && !b.Revoked
	case 'd':
		var b, l api.FeedDevice
		return json.Unmarshal(bucket, &b) == nil && json.Unmarshal(local, &l) == nil &&
			l.State == string(fleet.StateRevoked) && b.State != string(fleet.StateRevoked)
	}
	return false
}
