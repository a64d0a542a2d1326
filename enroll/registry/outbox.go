package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
)

// The outbox of the cluster's directory (Options.Shared). A commit and
// the directory's publication (bucket fleetgate_dir, cluster/dirfeed) are
// writes to two streams, and an atomic batch covers one stream only. So
// every transaction that writes a device's or a certificate's record also
// writes, in the same atomic batch, an outbox record holding the
// directory's record of it:
//
//	outbox.d.<device>   {"key":"d.<device>","rec":<api.FeedDevice>,"at":…}
//	outbox.c.<serial>   {"key":"c.<serial>","rec":<api.FeedCert>,"at":…}
//
// After the commit, the node publishes the records (Publisher: a merge by
// compare-and-swap, a revocation stays) and then deletes each outbox
// record at the revision it wrote (a later write's record stays). A node
// that dies in between leaves its outbox records behind: every node
// drains those it has seen unchanged (at one revision) for a few seconds,
// checking at start and periodically (RunOutbox). The age is this node's
// own observation, on its monotonic clock: never the committing node's
// clock (rec.At, kept for the log), which may run ahead or behind. Publishing twice is harmless: the bucket merges, and
// revocation is terminal there and in every directory.

const pfxOutbox = "outbox."

// Publisher writes a directory record (key d.<device> or c.<serial>, value
// an api.FeedDevice or api.FeedCert) into the cluster's directory bucket,
// merged with what the bucket holds (dirfeed.Feed.PublishRecord).
type Publisher func(ctx context.Context, key string, val []byte) error

// outboxRecord is an outbox key's value.
type outboxRecord struct {
	Key string          `json:"key"`
	Rec json.RawMessage `json:"rec"`
	At  time.Time       `json:"at"`
}

// outboxEntry is an outbox record written by a commit, at rev.
type outboxEntry struct {
	key string // outbox key
	rec outboxRecord
	rev uint64
}

// testHookAfterCommit, if set, runs after a transaction on the shared
// store committed and before its outbox is published: an error returned
// stops there, as a node that died between the two steps.
var testHookAfterCommit atomic.Pointer[func() error]

// SetPublisher installs the directory's publisher (the cluster's feed,
// once its bucket is open). Without one, outbox records stay until a
// node with one drains them.
func (r *Registry) SetPublisher(p Publisher) { r.publisher.Store(&p) }

func (r *Registry) publish() Publisher {
	if p := r.publisher.Load(); p != nil {
		return *p
	}
	return nil
}

// outboxOf returns the outbox record of a written registry record (store
// key k), if it is a device's or a certificate's.
func outboxOf(k string, val []byte, now time.Time) (string, outboxRecord, bool) {
	var dirKey string
	var rec any
	switch {
	case strings.HasPrefix(k, kvKey(pfxDevice)):
		var d fleet.Device
		if json.Unmarshal(val, &d) != nil {
			return "", outboxRecord{}, false
		}
		dirKey = "d." + d.ID
		rec = api.FeedDevice{ID: d.ID, Group: d.Group, State: string(d.State), Tags: d.Tags}
	case strings.HasPrefix(k, kvKey(pfxCert)):
		var c fleet.Certificate
		if json.Unmarshal(val, &c) != nil {
			return "", outboxRecord{}, false
		}
		dirKey = "c." + c.Serial
		rec = api.FeedCert{Serial: c.Serial, Role: string(c.Role), Name: c.Name, NotAfter: c.NotAfter.UTC(), Revoked: c.Revoked}
	default:
		return "", outboxRecord{}, false
	}
	b, err := json.Marshal(rec)
	if err != nil || kvtx.CheckKey(pfxOutbox+dirKey) != nil {
		return "", outboxRecord{}, false
	}
	return pfxOutbox + dirKey, outboxRecord{Key: dirKey, Rec: b, At: now.UTC()}, true
}

// publishOutbox publishes the records a commit wrote into its outbox and
// deletes them (each at its revision). A record that failed stays for the
// drain.
func (r *Registry) publishOutbox(ctx context.Context, entries []outboxEntry) {
	pub := r.publish()
	if pub == nil || len(entries) == 0 {
		return
	}
	var done []kvtx.Op
	for _, e := range entries {
		if err := pub(ctx, e.rec.Key, e.rec.Rec); err != nil {
			r.log.Warn("directory record not published yet; the outbox keeps it", "key", e.rec.Key, "err", err)
			continue
		}
		done = append(done, kvtx.Op{Key: e.key, Delete: true, Expect: e.rev})
	}
	r.deleteOutbox(ctx, done)
}

// deleteOutbox deletes published outbox records, all in one batch when
// none was written again meanwhile, else each on its own.
func (r *Registry) deleteOutbox(ctx context.Context, ops []kvtx.Op) {
	if len(ops) == 0 {
		return
	}
	if _, err := r.kv.Commit(ctx, ops...); err == nil || !errors.Is(err, kvtx.ErrRevision) {
		return // an unanswered delete: the drain publishes the record again, harmlessly
	}
	for _, op := range ops {
		_, _ = r.kv.Commit(ctx, op) // ErrRevision: written again since, its writer publishes it
	}
}

// outboxSeen records when the draining node first saw each outbox record
// at its current revision.
type outboxSeen struct {
	mu   sync.Mutex
	seen map[string]seenAt // by outbox key
}

type seenAt struct {
	rev uint64
	at  time.Time // time.Now: monotonic, this node's
}

// ages returns how long this node has seen entries[i] at its revision, and
// forgets the records no longer listed.
func (o *outboxSeen) ages(entries []kvtx.Entry, now time.Time) []time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	next := make(map[string]seenAt, len(entries))
	out := make([]time.Duration, len(entries))
	for i, e := range entries {
		s, ok := o.seen[e.Key]
		if !ok || s.rev != e.Rev {
			s = seenAt{rev: e.Rev, at: now}
		}
		next[e.Key] = s
		out[i] = now.Sub(s.at)
	}
	o.seen = next
	return out
}

// DrainOutbox publishes the outbox records this node has seen unchanged
// for minAge or longer (those of a node that died between its commit and
// the publication, or could not publish) and deletes them; a record is
// aged by this node's observation, never by its writer's clock (a record
// first seen now waits minAge from now). A device's revocation found
// there is also completed: its certificates are revoked in the records
// (RevokeDevice on a revoked device does only that). It returns how many
// it published.
func (r *Registry) DrainOutbox(ctx context.Context, minAge time.Duration) (int, error) {
	pub := r.publish()
	if r.kv == nil || pub == nil {
		return 0, nil
	}
	entries, err := r.kv.List(ctx, pfxOutbox)
	if err != nil {
		return 0, unavailable(err)
	}
	ages := r.outboxSeen.ages(entries, time.Now())
	n := 0
	for i, e := range entries {
		var rec outboxRecord
		if err := json.Unmarshal(e.Value, &rec); err != nil {
			r.log.Error("outbox record unreadable; deleting it", "key", e.Key, "err", err)
			r.deleteOutbox(ctx, []kvtx.Op{{Key: e.Key, Delete: true, Expect: e.Rev}})
			continue
		}
		if ages[i] < minAge {
			continue // its node may still be publishing it
		}
		if err := pub(ctx, rec.Key, rec.Rec); err != nil {
			return n, fmt.Errorf("registry: outbox %s: %w", rec.Key, err)
		}
		n++
		if id, ok := strings.CutPrefix(rec.Key, "d."); ok {
			var d api.FeedDevice
			if json.Unmarshal(rec.Rec, &d) == nil && d.State == string(fleet.StateRevoked) {
				if _, err := r.RevokeDevice(id, "revocation completed after its node stopped", "cluster"); err != nil && !errors.Is(err, ErrNotFound) {
					return n, err
				}
			}
		}
		r.log.Warn("directory record published from the outbox (its node stopped before publishing it, or could not)", "key", rec.Key, "committed_at", rec.At)
		r.deleteOutbox(ctx, []kvtx.Op{{Key: e.Key, Delete: true, Expect: e.Rev}})
	}
	return n, nil
}

// RunOutbox drains the outbox (DrainOutbox) at once and then every
// period, until ctx ends.
func (r *Registry) RunOutbox(ctx context.Context, period, minAge time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		dctx, cancel := context.WithTimeout(ctx, kvTimeout)
		if _, err := r.DrainOutbox(dctx, minAge); err != nil && ctx.Err() == nil {
			r.log.Warn("outbox of the cluster's directory not drained; retrying", "err", err)
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
