package registry

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
)

// Migration into a cluster. A node that joins a cluster (Options.Shared)
// may hold records of its own in badger: those of `fleetgate init` (the
// first operator's certificate, the server's), those of the single box it
// was, or those a node kept before the registry's records were shared.
// SeedShared copies them into the shared store where the store has no
// record under the key (never over one: the cluster's record is newer),
// once: a marker in badger says it is done. Audit records are copied under
// a key made of their content's hash, so the same record from several
// nodes (data directories copied from one init) is one record.

// metaSeeded marks the node's badger records copied into the cluster.
const metaSeeded = "meta/seeded"

// seedPrefixes are the record kinds copied, in this order.
var seedPrefixes = []string{pfxCert, "devcert/", pfxDevice, pfxEK, pfxToken, pfxOpRole, pfxPrincipal}

// seedBatch bounds one commit of SeedShared.
const seedBatch = 256

// SeedShared copies this node's badger records into the shared store
// where it lacks them and returns how many it wrote. It is idempotent, and
// a no-op once it has completed (or without a shared store).
func (r *Registry) SeedShared(ctx context.Context) (int, error) {
	if r.kv == nil {
		return 0, nil
	}
	done := false
	if err := r.db.View(func(t *badger.Txn) error {
		_, err := t.Get([]byte(metaSeeded))
		done = err == nil
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		return err
	}); err != nil || done {
		return 0, err
	}
	var ops []kvtx.Op
	if err := r.db.View(func(t *badger.Txn) error {
		bt := badgerTxn{t}
		for _, p := range seedPrefixes {
			if err := bt.scan(p, func(rest string, v []byte) error {
				ops = append(ops, seedOp(kvKey(p+rest), v))
				return nil
			}); err != nil {
				return err
			}
		}
		return bt.scan(pfxAudit, func(_ string, v []byte) error {
			var a AuditRecord
			if err := json.Unmarshal(v, &a); err != nil {
				return err
			}
			dev := a.DeviceID
			if dev == "" {
				dev = kvAuditNone
			}
			h := sha256.Sum256(v)
			ops = append(ops, seedOp("audit."+dev+".m"+hex.EncodeToString(h[:12]), v))
			return nil
		})
	}); err != nil {
		return 0, fmt.Errorf("registry: read the node's records: %w", err)
	}
	written := 0
	for start := 0; start < len(ops); start += seedBatch {
		n, err := r.seedCommit(ctx, ops[start:min(start+seedBatch, len(ops))])
		written += n
		if err != nil {
			return written, err
		}
	}
	if err := r.db.Update(func(t *badger.Txn) error { return t.Set([]byte(metaSeeded), []byte("1")) }); err != nil {
		return written, err
	}
	if written > 0 {
		r.log.Info("the node's registry records copied into the cluster's store", "records", written, "of", len(ops))
	}
	return written, nil
}

func seedOp(key string, v []byte) kvtx.Op {
	if len(v) == 0 {
		v = []byte{'-'}
	}
	return kvtx.Op{Key: key, Value: v} // Expect 0: only where no record ever was
}

// seedCommit writes ops in one batch, or, when the store already has one
// of them, each on its own (those it has are left).
func (r *Registry) seedCommit(ctx context.Context, ops []kvtx.Op) (int, error) {
	_, err := r.kv.Commit(ctx, ops...)
	switch {
	case err == nil:
		return len(ops), nil
	case !errors.Is(err, kvtx.ErrRevision) && !errors.Is(err, kvtx.ErrKey):
		return 0, unavailable(err)
	}
	n := 0
	for _, op := range ops {
		switch _, err := r.kv.Commit(ctx, op); {
		case err == nil:
			n++
		case errors.Is(err, kvtx.ErrRevision):
		case errors.Is(err, kvtx.ErrKey):
			r.log.Warn("a record of the node not copied into the cluster: its key is not a cluster key", "key", op.Key)
		default:
			return n, unavailable(err)
		}
	}
	return n, nil
}
