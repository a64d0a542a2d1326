package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
)

// The registry on a kvtx.Store (Options.Shared: a cluster's JetStream
// bucket). A transaction (kvTxn) reads each key from the store (the
// stream's leader, so a node reads what any node committed), buffers its
// writes, and commits them in one atomic batch in which every key it
// writes, and every key it guards, expects the revision it was read at:
// optimistic concurrency, as badger's own transactions. A concurrent
// change of one of them on any node refuses the whole batch (ErrConflict)
// and the caller retries or fails. docs/cluster.md, "Registry across
// nodes".

// kvTimeout bounds one transaction on the store.
const kvTimeout = 10 * time.Second

// maxKVOps bounds the writes of one transaction: JetStream's atomic
// batches hold at most 1000 messages (nats-server's default).
const maxKVOps = 900

// ErrUnavailable: the record store did not answer (a cluster's store
// without quorum or leader, or a timeout; a closed badger): nothing is
// half written (a commit that timed out may still apply, whole, later).
// The APIs answer 503 store_unavailable with Retry-After.
var ErrUnavailable = errors.New("registry: store unavailable")

// ErrSharedToken is ErrUnavailable (its earlier name, for tokens).
var ErrSharedToken = ErrUnavailable

// errTooBig: a transaction with more writes than one batch holds.
var errTooBig = errors.New("registry: transaction too large for one batch")

// kvKey is the store's key of a registry key.
func kvKey(key string) string { return strings.ReplaceAll(key, "/", ".") }

type kvWrite struct {
	val []byte
	del bool
}

type kvRead struct {
	val   []byte
	rev   uint64
	found bool
}

type kvTxn struct {
	ctx    context.Context
	s      kvtx.Store
	now    time.Time
	outbox []outboxEntry     // written by the commit, with their revisions
	reads  map[string]kvRead // by store key
	writes map[string]kvWrite
	order  []string // keys of writes, in first-write order
	guards map[string]bool
}

func newKVTxn(ctx context.Context, s kvtx.Store) *kvTxn {
	return &kvTxn{ctx: ctx, s: s, reads: map[string]kvRead{}, writes: map[string]kvWrite{}, guards: map[string]bool{}}
}

func unavailable(err error) error {
	if errors.Is(err, ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %v", ErrUnavailable, err)
}

func (t *kvTxn) read(k string) (kvRead, error) {
	if r, ok := t.reads[k]; ok {
		return r, nil
	}
	e, err := t.s.Get(t.ctx, k)
	var r kvRead
	switch {
	case err == nil:
		r = kvRead{val: e.Value, rev: e.Rev, found: true}
	case errors.Is(err, kvtx.ErrNotFound):
		r = kvRead{rev: e.Rev}
	case errors.Is(err, kvtx.ErrKey):
		return kvRead{}, ErrNotFound // no such key can exist
	default:
		return kvRead{}, unavailable(err)
	}
	t.reads[k] = r
	return r, nil
}

func (t *kvTxn) getRaw(key string) ([]byte, error) {
	k := kvKey(key)
	if w, ok := t.writes[k]; ok {
		if w.del {
			return nil, ErrNotFound
		}
		return w.val, nil
	}
	r, err := t.read(k)
	if err != nil {
		return nil, err
	}
	if !r.found {
		return nil, ErrNotFound
	}
	return r.val, nil
}

func (t *kvTxn) write(key string, w kvWrite) error {
	k := kvKey(key)
	if err := kvtx.CheckKey(k); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if _, ok := t.writes[k]; !ok {
		t.order = append(t.order, k)
	}
	t.writes[k] = w
	return nil
}

func (t *kvTxn) set(key string, val []byte) error {
	if len(val) == 0 {
		val = []byte{'-'} // index keys: a value, never an empty message
	}
	return t.write(key, kvWrite{val: val})
}

func (t *kvTxn) del(key string) error { return t.write(key, kvWrite{del: true}) }

func (t *kvTxn) guard(key string) {
	k := kvKey(key)
	if _, ok := t.reads[k]; ok {
		t.guards[k] = true
	}
}

func (t *kvTxn) scan(prefix string, fn func(string, []byte) error) error {
	p := kvKey(prefix)
	entries, err := t.s.List(t.ctx, p)
	if err != nil {
		if errors.Is(err, kvtx.ErrKey) {
			return nil
		}
		return unavailable(err)
	}
	vals := map[string][]byte{}
	for _, e := range entries {
		vals[e.Key] = e.Value
		if _, ok := t.reads[e.Key]; !ok {
			t.reads[e.Key] = kvRead{val: e.Value, rev: e.Rev, found: true}
		}
	}
	for k, w := range t.writes {
		if strings.HasPrefix(k, p) {
			if w.del {
				delete(vals, k)
			} else {
				vals[k] = w.val
			}
		}
	}
	keys := make([]string, 0, len(vals))
	for k := range vals {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if err := fn(k[len(p):], vals[k]); err != nil {
			return err
		}
	}
	return nil
}

// ops are the commit's writes: each expects the revision it was read at
// (a key never read is written unconditionally: an index key, an audit
// record under a unique key), and each guarded key not written is
// written again with its value, at its revision. Each device or
// certificate record written adds its outbox record (outbox.go), written
// unconditionally; t.outbox lists them.
func (t *kvTxn) ops() []kvtx.Op {
	var ops []kvtx.Op
	t.outbox = t.outbox[:0]
	for _, k := range t.order {
		w := t.writes[k]
		op := kvtx.Op{Key: k, Value: w.val, Delete: w.del}
		if r, ok := t.reads[k]; ok {
			op.Expect = r.rev
		} else {
			op.Any = true
		}
		ops = append(ops, op)
	}
	for _, k := range t.order {
		if w := t.writes[k]; !w.del {
			if obk, rec, found := outboxOf(k, w.val, t.now); found {
				if _, twice := t.writes[obk]; !twice {
					t.outbox = append(t.outbox, outboxEntry{key: obk, rec: rec})
					b, _ := json.Marshal(rec)
					ops = append(ops, kvtx.Op{Key: obk, Value: b, Any: true})
				}
			}
		}
	}
	guards := make([]string, 0, len(t.guards))
	for k := range t.guards {
		if _, written := t.writes[k]; !written {
			guards = append(guards, k)
		}
	}
	slices.Sort(guards)
	for _, k := range guards {
		r := t.reads[k]
		if r.found {
			ops = append(ops, kvtx.Op{Key: k, Value: r.val, Expect: r.rev})
		} else {
			ops = append(ops, kvtx.Op{Key: k, Delete: true, Expect: r.rev})
		}
	}
	return ops
}

func (t *kvTxn) commit() error {
	ops := t.ops()
	if len(ops) == 0 {
		return nil
	}
	if len(ops) > maxKVOps {
		return fmt.Errorf("%w: %d writes", errTooBig, len(ops))
	}
	revs, err := t.s.Commit(t.ctx, ops...)
	if err != nil {
		if errors.Is(err, kvtx.ErrRevision) {
			return fmt.Errorf("%w: %v", ErrConflict, err)
		}
		return unavailable(err)
	}
	pos := map[string]int{}
	for i, op := range ops {
		pos[op.Key] = i
	}
	for i := range t.outbox {
		t.outbox[i].rev = revs[pos[t.outbox[i].key]]
	}
	return nil
}

func (r *Registry) kvView(fn func(txn) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	return fn(newKVTxn(ctx, r.kv))
}

func (r *Registry) kvUpdate(fn func(txn) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	t := newKVTxn(ctx, r.kv)
	t.now = r.now()
	if err := fn(t); err != nil {
		return err
	}
	if err := t.commit(); err != nil {
		return err
	}
	if hook := testHookAfterCommit.Load(); hook != nil {
		if err := (*hook)(); err != nil {
			return err
		}
	}
	r.publishOutbox(ctx, t.outbox)
	return nil
}
