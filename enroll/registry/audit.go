package registry

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Audit keys:
//
//	audit/<seq, 8 bytes big-endian>        the record (JSON); seq order is commit order
//	auditdev/<device ID>/<seq, 8 bytes>    empty: the device's records, for AuditPage's filter
//	meta/auditdev                          set once every record has its index key
//
// Device IDs are [a-z0-9-]{1,64}, so "/" ends the ID in an index key.
const (
	pfxAuditDev  = "auditdev/"
	metaAuditDev = "meta/auditdev"
)

// Bounds of audit record fields. Every field may carry text a peer chose
// (a path, a refusal's cause); the registry bounds them whatever the caller
// did, so no request can make one record large.
const (
	maxAuditField  = 256
	maxAuditReason = 1024
	// maxAuditSerials bounds Serial, which holds the comma-separated
	// serials of a device revocation (33 bytes each).
	maxAuditSerials = 64 << 10
)

// MaxAuditQueue bounds the batched audit records waiting for their write
// (AuditBatched). Beyond it records are counted, not kept, and the count is
// written as one record with the next batch.
const MaxAuditQueue = 4096

// MaxAuditPage is the most records AuditPage returns at once.
const MaxAuditPage = 1000

type auditState struct {
	mu      sync.Mutex // guards queue and dropped
	queue   []AuditRecord
	dropped int
	wake    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	// keysRead counts the keys AuditPage read (tests: a page reads about
	// as many keys as it returns).
	keysRead atomic.Uint64
	// batches counts batched writes (tests).
	batches atomic.Uint64
}

// Audit appends a record, durably (one synced transaction) before it
// returns. It never fails the caller: an audit write error is logged at
// error level (and the record with it).
func (r *Registry) Audit(a AuditRecord) {
	if r.kv == nil {
		r.auditMu.Lock()
		defer r.auditMu.Unlock()
	}
	err := r.update(func(txn txn) error { return r.putAudit(txn, &a) })
	if err != nil {
		r.log.Error("audit write failed", "err", err, "action", a.Action, "device", a.DeviceID, "outcome", a.Outcome, "reason", logguard.Clip(a.Reason, maxAuditField))
	}
}

// AuditBatched queues a record to be written with others in one
// transaction, soon after; it does not wait for the write. It is for
// records nobody was promised anything about — refusals of unauthenticated
// requests — so that a flood of them costs a synced write per batch, not
// per request. The queue is bounded (MaxAuditQueue); records beyond it are
// counted and the count is audited. Readers (AuditPage) and Close write
// the queue first, so a record queued before a read is in it.
func (r *Registry) AuditBatched(a AuditRecord) {
	if a.Time.IsZero() {
		a.Time = r.now()
	}
	r.audit.mu.Lock()
	if len(r.audit.queue) >= MaxAuditQueue {
		r.audit.dropped++
	} else {
		r.audit.queue = append(r.audit.queue, a)
	}
	r.audit.mu.Unlock()
	select {
	case r.audit.wake <- struct{}{}:
	default:
	}
}

// AuditBatches returns the number of batched writes so far (tests).
func (r *Registry) AuditBatches() uint64 { return r.audit.batches.Load() }

// AuditKeysRead returns the number of keys AuditPage has read so far
// (tests: reading a page must not scan the log).
func (r *Registry) AuditKeysRead() uint64 { return r.audit.keysRead.Load() }

func (r *Registry) startAuditFlusher() {
	r.audit.wake = make(chan struct{}, 1)
	r.audit.stop = make(chan struct{})
	r.audit.done = make(chan struct{})
	go func() {
		defer close(r.audit.done)
		for {
			select {
			case <-r.audit.wake:
				r.flushAudit()
			case <-r.audit.stop:
				r.flushAudit()
				return
			}
		}
	}()
}

func (r *Registry) stopAuditFlusher() {
	if r.audit.stop == nil {
		return
	}
	select {
	case <-r.audit.stop:
	default:
		close(r.audit.stop)
	}
	<-r.audit.done
}

// flushAudit writes every queued record in one transaction (in as many as
// badger needs when the batch is too large for one). Records queued while
// a batch is written go into the next: under load, batches grow by
// themselves.
func (r *Registry) flushAudit() {
	r.auditMu.Lock()
	defer r.auditMu.Unlock()
	r.audit.mu.Lock()
	q, dropped := r.audit.queue, r.audit.dropped
	r.audit.queue, r.audit.dropped = nil, 0
	r.audit.mu.Unlock()
	if dropped > 0 {
		q = append(q, AuditRecord{Time: r.now(), Actor: "fleetgate", Action: "audit.dropped", Outcome: OutcomeDenied,
			Reason: fmt.Sprintf("%d audit records of refused requests dropped: more than %d were waiting for their write", dropped, MaxAuditQueue)})
	}
	for len(q) > 0 {
		n := 0
		err := r.update(func(txn txn) error {
			for n = 0; n < len(q); n++ {
				if r.kv != nil && n == auditKVBatch {
					return nil // commit these, the rest in the next
				}
				if err := r.putAudit(txn, &q[n]); err != nil {
					if errors.Is(err, badger.ErrTxnTooBig) && n > 0 {
						return nil // commit these, the rest in the next
					}
					return err
				}
			}
			return nil
		})
		if err != nil {
			r.log.Error("audit batch write failed", "err", err, "records", len(q))
			return
		}
		r.audit.batches.Add(1)
		q = q[n:]
	}
}

// putAudit writes a in txn with sequence number auditNext, and auditNext+1
// as the stored next number, and increments auditNext. The caller holds
// auditMu from before the transaction until after it ends: sequence order
// is commit order. A transaction that fails after putAudit leaves a gap in
// the sequence, never a reused number. Fields are bounded (maxAudit*).
func (r *Registry) putAudit(txn txn, a *AuditRecord) error {
	if r.kv == nil {
		a.Seq = r.auditNext
	}
	if a.Time.IsZero() {
		a.Time = r.now()
	}
	a.Actor = logguard.Bound(a.Actor, maxAuditField)
	a.Action = logguard.Bound(a.Action, maxAuditField)
	a.Outcome = logguard.Bound(a.Outcome, maxAuditField)
	a.Remote = logguard.Bound(a.Remote, maxAuditField)
	a.Reason = logguard.Bound(a.Reason, maxAuditReason)
	a.Serial = logguard.Bound(a.Serial, maxAuditSerials)
	if a.DeviceID != "" && identity.ValidateName(a.DeviceID) != nil {
		// Not a device ID: kept, bounded, in the reason; never a key.
		a.Reason = logguard.Bound("device "+a.DeviceID+": "+a.Reason, maxAuditReason)
		a.DeviceID = ""
	}
	b, err := json.Marshal(a)
	if err != nil {
		return fmt.Errorf("registry: encode: %w", err)
	}
	if r.kv != nil {
		return txn.set(kvAuditKey(a.DeviceID), b)
	}
	if err := txn.set(string(auditKey(a.Seq)), b); err != nil {
		return err
	}
	if a.DeviceID != "" {
		if err := txn.set(string(auditDevKey(a.DeviceID, a.Seq)), nil); err != nil {
			return err
		}
	}
	next := make([]byte, 8)
	binary.BigEndian.PutUint64(next, a.Seq+1)
	if err := txn.set(seqAudit, next); err != nil {
		return err
	}
	r.auditNext++
	return nil
}

func auditKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(pfxAudit), seq)
}

func auditDevKey(device string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(pfxAuditDev+device+"/"), seq)
}

// indexAuditByDevice writes the device index keys of records written before
// the index existed, once.
func (r *Registry) indexAuditByDevice() error {
	done := false
	if err := r.db.View(func(txn *badger.Txn) error {
		_, err := txn.Get([]byte(metaAuditDev))
		if err == nil {
			done = true
			return nil
		}
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		return err
	}); err != nil || done {
		return err
	}
	wb := r.db.NewWriteBatch()
	defer wb.Cancel()
	if err := r.db.View(func(txn *badger.Txn) error {
		return iterate(badgerTxn{txn}, pfxAudit, func(a *AuditRecord) error {
			if a.DeviceID == "" || identity.ValidateName(a.DeviceID) != nil {
				return nil
			}
			return wb.Set(auditDevKey(a.DeviceID, a.Seq), nil)
		})
	}); err != nil {
		return fmt.Errorf("registry: index audit log: %w", err)
	}
	if err := wb.Set([]byte(metaAuditDev), []byte("1")); err != nil {
		return err
	}
	return wb.Flush()
}

// AuditQuery selects a page of the audit log, newest first.
type AuditQuery struct {
	// DeviceID, if set, selects that device's records (through the
	// device index: other records are not read).
	DeviceID string
	// Limit is the page size: 1..MaxAuditPage (0 or more: MaxAuditPage).
	Limit int
	// Cursor is the Next of the previous page; empty: the newest records.
	Cursor string
}

// ErrAuditCursor: the cursor is not one AuditPage returned.
var ErrAuditCursor = errors.New("registry: malformed audit cursor")

// AuditPage returns up to q.Limit records, newest first, older than
// q.Cursor, and the cursor of the next page (empty when there is none). It
// reads about as many keys as it returns: records are keyed by sequence
// number (reverse iteration from the cursor) and a device's records by a
// secondary key per record. Batched records queued before the call are
// written first.
func (r *Registry) AuditPage(q AuditQuery) ([]AuditRecord, string, error) {
	limit := q.Limit
	if limit <= 0 || limit > MaxAuditPage {
		limit = MaxAuditPage
	}
	before := ^uint64(0) // exclusive upper bound
	if q.Cursor != "" {
		v, err := strconv.ParseUint(q.Cursor, 10, 64)
		if err != nil || v == 0 {
			return nil, "", ErrAuditCursor
		}
		before = v
	}
	if q.DeviceID != "" && identity.ValidateName(q.DeviceID) != nil {
		return nil, "", nil // no such device can have records
	}
	r.flushAudit()
	if r.kv != nil {
		return r.auditPageKV(q.DeviceID, limit, before)
	}
	var out []AuditRecord
	more := false
	err := r.db.View(func(txn *badger.Txn) error {
		prefix := []byte(pfxAudit)
		if q.DeviceID != "" {
			prefix = []byte(pfxAuditDev + q.DeviceID + "/")
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, Reverse: true})
		defer it.Close()
		// In reverse, Seek goes to the last key <= its argument.
		start := binary.BigEndian.AppendUint64(append([]byte(nil), prefix...), before-1)
		for it.Seek(start); it.Valid(); it.Next() {
			r.audit.keysRead.Add(1)
			k := it.Item().Key()
			if len(k) != len(prefix)+8 {
				return fmt.Errorf("registry: audit key %q", k)
			}
			if len(out) == limit {
				more = true
				return nil
			}
			var a AuditRecord
			item := it.Item()
			if q.DeviceID != "" {
				var err error
				if item, err = txn.Get(auditKey(binary.BigEndian.Uint64(k[len(prefix):]))); err != nil {
					return fmt.Errorf("registry: audit index %q: %w", k, err)
				}
				r.audit.keysRead.Add(1)
			}
			if err := item.Value(func(b []byte) error { return json.Unmarshal(b, &a) }); err != nil {
				return fmt.Errorf("registry: decode %q: %w", item.Key(), err)
			}
			out = append(out, a)
		}
		return nil
	})
	if err != nil || !more {
		return out, "", err
	}
	return out, strconv.FormatUint(out[len(out)-1].Seq, 10), nil
}

// AuditLog returns audit records oldest first, optionally only those of one
// device, at most limit (0: all) of the newest. It reads them through
// AuditPage.
func (r *Registry) AuditLog(deviceID string, limit int) ([]AuditRecord, error) {
	var out []AuditRecord
	cursor := ""
	for {
		n := MaxAuditPage
		if limit > 0 {
			n = min(n, limit-len(out))
		}
		page, next, err := r.AuditPage(AuditQuery{DeviceID: deviceID, Limit: n, Cursor: cursor})
		if err != nil {
			return nil, err
		}
		out = append(out, page...)
		if next == "" || (limit > 0 && len(out) >= limit) {
			break
		}
		cursor = next
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

// updateAudited is update for a transaction that may append an audit
// record (putAudit, putIssuedAudit): with audited, auditMu is held around
// it. Lock order: writeMu, then auditMu.
//
// A conflict is retried (updateRetry). On a kvtx store the audit record
// needs no lock: its order is its revision (kvaudit.go).
func (r *Registry) updateAudited(audited bool, fn func(txn) error) error {
	if !audited || r.kv != nil {
		return r.updateRetry(fn)
	}
	r.auditMu.Lock()
	defer r.auditMu.Unlock()
	return r.updateRetry(fn)
}

// putIssuedAudit appends a copy of a as the audit record of the successful
// issuance of serial, in the issuing transaction txn (nil a: none). The
// caller runs that transaction with updateAudited.
func (r *Registry) putIssuedAudit(txn txn, a *AuditRecord, serial string) error {
	if a == nil {
		return nil
	}
	rec := *a
	rec.Outcome, rec.Serial = OutcomeOK, serial
	return r.putAudit(txn, &rec)
}
