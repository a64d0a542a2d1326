package registry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/nats-io/nuid"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
)

// The audit log on a kvtx store (a cluster): an append-only log inside
// the registry's bucket. Each record is a key of its own, written once and
// never changed:
//
//	audit.<device ID>.<unique ID>   a device's record (JSON AuditRecord)
//	audit._.<unique ID>             a record about no device
//
// Its sequence number (AuditRecord.Seq) is the revision of its write: the
// bucket's stream sequence, which orders every commit of every node, so
// sequence order is commit order across the cluster and no counter is
// shared (appends on several nodes never conflict). A record written with
// an issuance is in the issuance's atomic batch. Reading newest first
// walks the stream backwards by windows of revisions, each read forward
// with the stream's subject filter (kvtx.Log: a short-lived consumer on
// the stream), so a page of the log, or of one device's records, reads
// about the records it returns.

// auditKVBatch bounds the records of one batched write.
const auditKVBatch = 256

// kvAuditNone is the device token of records about no device (device IDs
// are [a-z0-9-], so it names none).
const kvAuditNone = "_"

func kvAuditKey(device string) string {
	if device == "" {
		device = kvAuditNone
	}
	return "audit/" + device + "/" + nuid.Next()
}

// auditPageKV is AuditPage on a kvtx store: up to limit records older than
// revision before, newest first.
func (r *Registry) auditPageKV(device string, limit int, before uint64) ([]AuditRecord, string, error) {
	log, ok := r.kv.(kvtx.Log)
	if !ok {
		return nil, "", errors.New("registry: the cluster store cannot read the audit log in order")
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvTimeout)
	defer cancel()
	prefix := "audit."
	if device != "" {
		prefix += device + "."
	}
	hi := before // exclusive
	if before == ^uint64(0) {
		last, err := log.LastRev(ctx)
		if err != nil {
			return nil, "", unavailable(err)
		}
		hi = last + 1
	}
	var out []AuditRecord
	for w := uint64(limit) + 1; hi > 1 && len(out) <= limit; w *= 2 {
		lo := uint64(1)
		if hi > w+1 {
			lo = hi - w
		}
		var win []AuditRecord // ascending
		if err := log.Scan(ctx, prefix, lo, hi, func(e kvtx.Entry) error {
			r.audit.keysRead.Add(1)
			var a AuditRecord
			if err := json.Unmarshal(e.Value, &a); err != nil {
				return fmt.Errorf("registry: decode %s: %w", e.Key, err)
			}
			a.Seq = e.Rev
			win = append(win, a)
			return nil
		}); err != nil {
			return nil, "", unavailable(err)
		}
		for i := len(win) - 1; i >= 0; i-- {
			out = append(out, win[i])
		}
		hi = lo
	}
	if len(out) <= limit {
		return out, "", nil
	}
	out = out[:limit]
	return out, strconv.FormatUint(out[limit-1].Seq, 10), nil
}
