// Package registry is fleetgate's source of truth: devices, issued
// certificates, bootstrap tokens and the append-only audit log, stored in
// badger on a single box and in a kvtx store (a JetStream bucket) shared
// by a cluster's nodes (kvstore.go). It feeds the in-memory view of certificate serials and device
// states (a directory.Directory) that the broker consults on each handshake
// and ACL check without touching disk: it writes each committed change into
// the directory, in commit order, before the call that made it returns.
package registry

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Key prefixes.
const (
	pfxDevice = "dev/"
	pfxCert   = "cert/"
	pfxToken  = "tok/"
	pfxAudit  = "audit/"
	seqAudit  = "seq/audit"
)

// Registry is safe for concurrent use.
type Registry struct {
	db  *badger.DB
	log *slog.Logger
	now func() time.Time
	// auditMu orders audit appends so that sequence order is commit order.
	// It guards auditNext, the sequence number of the next audit record.
	// Each record is written together with the next number (key
	// seqAudit) in one transaction: one synced write per record, no gaps
	// from leases.
	auditMu   sync.Mutex
	auditNext uint64
	// audit holds the queue of batched audit records (AuditBatched), the
	// flusher and the read counter (audit.go).
	audit auditState

	// writeMu orders every change of device or certificate state: the
	// transaction and the directory update that follows it happen under
	// it, so the directory applies changes in commit order (a renewal that
	// committed before a revocation cannot overwrite it in the directory).
	writeMu sync.Mutex
	// issues groups concurrent issuances into one transaction (groupcommit.go).
	issues issueGroup
	// redeeming holds the IDs of the tokens being redeemed (signing), so
	// that a token is signed for once at a time (RedeemTokenAudited).
	redeeming sync.Map
	// removeMu makes RemoveOperator's last-admin check and removal one
	// step (admin.go).
	removeMu sync.Mutex

	// dir is the in-memory view the registry feeds, after each commit and
	// in commit order (under writeMu); its watchers are told of every
	// committed change after the view has it.
	dir *directory.Directory
	// kv is Options.Shared: when set, every record is there (kvstore.go)
	// and db holds only what this node had before it joined a cluster
	// (cluster.go: SeedShared).
	kv kvtx.Store
	// publisher publishes the outbox of kv's commits into the cluster's
	// directory bucket (outbox.go).
	publisher atomic.Pointer[Publisher]
	// outboxSeen: when this node first saw each outbox record (DrainOutbox).
	outboxSeen outboxSeen
}

// Options configure Open.
type Options struct {
	Logger *slog.Logger
	Now    func() time.Time
	// InMemory runs badger without disk (tests of pure logic only).
	InMemory bool
	// Directory is the view to feed (empty; default a new one).
	Directory *directory.Directory
	// Shared, if set, is the store a cluster's nodes share (kvtx on
	// JetStream): every record of the registry lives there (devices,
	// certificates, EKs, tokens, operator roles, the audit log), so any
	// node renews, lists, audits and registers EKs, and a token is
	// redeemed once on any node (kvstore.go). The badger in dir keeps
	// only what the node held before (SeedShared copies it). nil: the
	// single box, badger only.
	Shared kvtx.Store
	// DirectoryFed: a cluster's feed (cluster/dirfeed) loads the
	// directory, so Open does not read Shared (which may not be open
	// yet); it loads the node's own badger records, which the feed
	// republishes where the cluster lacks them. Without it, Open loads
	// the directory from Shared.
	DirectoryFed bool
}

// Open opens (or creates) the registry in dir and loads its records into
// the directory (Options.Directory, or a new one).
func Open(dir string, o Options) (*Registry, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	bo := badger.DefaultOptions(dir).WithLogger(nil).WithInMemory(o.InMemory).
		// A registry is small; keep its memory footprint modest.
		WithMemTableSize(8 << 20).WithNumMemtables(2).WithBlockCacheSize(8 << 20).
		WithValueLogFileSize(64 << 20).WithSyncWrites(true).
		// Each compactor wakes every 50 ms, even with nothing to do; the
		// default 4 cost an idle gateway several ms of CPU per second. Two
		// (the least badger allows; one prefers L0) are plenty for a
		// registry's write rate.
		WithNumCompactors(2)
	if o.InMemory {
		bo.Dir, bo.ValueDir = "", ""
	}
	db, err := badger.Open(bo)
	if err != nil {
		return nil, fmt.Errorf("registry: open badger %s: %w", dir, err)
	}
	if o.Directory == nil {
		o.Directory = directory.New()
	}
	r := &Registry{db: db, log: o.Logger, now: o.Now, dir: o.Directory}
	// The directory comes from the records (the shared ones, or with
	// DirectoryFed the node's own badger ones).
	if !o.DirectoryFed {
		r.kv = o.Shared
	}
	if err := r.loadIndex(); err != nil {
		db.Close()
		return nil, err
	}
	r.kv = o.Shared
	if r.kv == nil {
		if err := r.loadAuditSeq(); err != nil {
			db.Close()
			return nil, err
		}
		if err := r.indexAuditByDevice(); err != nil {
			db.Close()
			return nil, err
		}
	}
	r.startAuditFlusher()
	return r, nil
}

// Close writes the batched audit records still queued and releases the
// database.
func (r *Registry) Close() error {
	r.stopAuditFlusher()
	return r.db.Close()
}

// loadAuditSeq sets auditNext past both the stored next number (seqAudit,
// big-endian uint64: the format of a badger.Sequence lease, which earlier
// versions used) and the last audit record, so that no number is reused.
func (r *Registry) loadAuditSeq() error {
	return r.db.View(func(txn *badger.Txn) error {
		next := uint64(0)
		switch it, err := txn.Get([]byte(seqAudit)); {
		case err == nil:
			if err := it.Value(func(v []byte) error {
				if len(v) != 8 {
					return fmt.Errorf("registry: audit sequence is %d bytes", len(v))
				}
				next = binary.BigEndian.Uint64(v)
				return nil
			}); err != nil {
				return err
			}
		case !errors.Is(err, badger.ErrKeyNotFound):
			return fmt.Errorf("registry: audit sequence: %w", err)
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(pfxAudit), Reverse: true})
		defer it.Close()
		// In reverse, Seek goes to the last key <= the argument.
		it.Seek(append([]byte(pfxAudit), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff))
		if it.Valid() {
			k := it.Item().Key()
			if len(k) != len(pfxAudit)+8 {
				return fmt.Errorf("registry: audit key %q", k)
			}
			next = max(next, binary.BigEndian.Uint64(k[len(pfxAudit):])+1)
		}
		r.auditNext = next
		return nil
	})
}

func (r *Registry) loadIndex() error {
	return r.view(func(txn txn) error {
		if err := iterate(txn, pfxCert, func(c *fleet.Certificate) error {
			r.dir.Load(c)
			return nil
		}); err != nil {
			return err
		}
		return iterate(txn, pfxDevice, func(d *fleet.Device) error {
			r.dir.LoadDevice(d)
			return nil
		})
	})
}

// Directory returns the in-memory view the registry feeds: the broker in
// the same process and the change feed read it.
func (r *Registry) Directory() *directory.Directory { return r.dir }

// CertStatus returns the in-memory view of a serial. ok is false if the
// registry never issued it.
func (r *Registry) CertStatus(serial string) (fleet.CertStatus, bool) {
	return r.dir.CertStatus(serial)
}

// DeviceStatus returns the in-memory view of a device.
func (r *Registry) DeviceStatus(id string) (fleet.DeviceStatus, bool) { return r.dir.DeviceStatus(id) }

// PrincipalRole returns the role of a service or operator name that the
// registry issued a certificate to.
func (r *Registry) PrincipalRole(name string) (identity.Role, bool) { return r.dir.PrincipalRole(name) }

// Watch registers fn to be told of every committed change (see
// directory.Watchers.Watch).
func (r *Registry) Watch(fn func(fleet.Event)) { r.dir.Watch(fn) }
