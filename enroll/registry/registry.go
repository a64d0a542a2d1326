// Package registry is fleetgate's source of truth: devices, issued
// certificates, bootstrap tokens and the append-only audit log, stored in
// badger. It also keeps an in-memory index of certificate serials and device
// states, in step with every commit, that the broker consults on each
// handshake and ACL check without touching disk: the registry writes each
// committed change, in commit order, into a directory.Directory.
package registry

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/fleetgate/fleetgate/fleet"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/directory"
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

	// dir is the in-memory view the registry feeds, after each commit and
	// in commit order (under writeMu); its watchers are told of every
	// committed change after the view has it.
	dir *directory.Directory
}

// Options configure Open.
type Options struct {
	Logger *slog.Logger
	Now    func() time.Time
	// InMemory runs badger without disk (tests of pure logic only).
	InMemory bool
	// Directory is the view to feed (empty; default a new one).
	Directory *directory.Directory
}

// Open opens (or creates) the registry in dir and loads the in-memory index.
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
	if err := r.loadIndex(); err != nil {
		db.Close()
		return nil, err
	}
	if err := r.loadAuditSeq(); err != nil {
		db.Close()
		return nil, err
	}
	if err := r.indexAuditByDevice(); err != nil {
		db.Close()
		return nil, err
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
	return r.db.View(func(txn *badger.Txn) error {
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

// ---- tokens ----

// HashTokenSecret is the stored form of a token secret.
func HashTokenSecret(secret []byte) []byte {
	h := sha256.Sum256(secret)
	return h[:]
}

// CreateToken stores t. A token for a revoked device is refused.
func (r *Registry) CreateToken(t Token, actor string) error {
	err := r.update(func(txn *badger.Txn) error {
		var d fleet.Device
		switch err := get(txn, pfxDevice+t.DeviceID, &d); {
		case err == nil:
			if d.State == fleet.StateRevoked {
				return fmt.Errorf("%w: %s", ErrDeviceRevoked, t.DeviceID)
			}
			// A device bound to a TPM enrolls by attestation only: a token
			// would let a software key take its identity.
			if d.EKFingerprint != "" {
				return fmt.Errorf("%w: %s is bound to a TPM EK; it enrolls by TPM attestation", ErrTPMBound, t.DeviceID)
			}
		case !errors.Is(err, ErrNotFound):
			return err
		}
		return put(txn, pfxToken+t.ID, &t)
	})
	r.Audit(AuditRecord{Actor: actor, Action: "token.create", DeviceID: t.DeviceID, Outcome: outcome(err), Reason: reason(err)})
	return err
}

// TokenRedemption is what RedeemToken hands the signing callback.
type TokenRedemption struct {
	Device fleet.Device
	Token  Token
}

// RedeemToken checks a token (constant-time comparison of the secret hash,
// expiry, single use, device binding, device state) and, in the same
// transaction, marks it used, creates or updates the device and records the
// certificate that sign returns. Nothing is recorded if any step fails, and
// a token can be redeemed at most once even under concurrent requests.
func (r *Registry) RedeemToken(tokenID string, secret []byte, deviceID string, sign func(TokenRedemption) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	return r.RedeemTokenAudited(tokenID, secret, deviceID, nil, sign)
}

// RedeemTokenAudited is RedeemToken that also writes audit, if not nil, as
// the audit record of the successful enrollment in the same transaction
// (with the certificate's serial and outcome ok). Nothing is written on
// failure: the caller audits the refusal.
func (r *Registry) RedeemTokenAudited(tokenID string, secret []byte, deviceID string, audit *AuditRecord, sign func(TokenRedemption) (*fleet.Certificate, error)) (*fleet.Certificate, error) {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	var out *fleet.Certificate
	var dev fleet.Device
	err := r.updateAudited(audit != nil, func(txn *badger.Txn) error {
		now := r.now()
		var t Token
		if err := get(txn, pfxToken+tokenID, &t); err != nil {
			if errors.Is(err, ErrNotFound) {
				return ErrTokenUnknown
			}
			return err
		}
		if subtle.ConstantTimeCompare(t.Hash, HashTokenSecret(secret)) != 1 {
			return ErrTokenUnknown
		}
		if !t.UsedAt.IsZero() {
			return ErrTokenUsed
		}
		if !now.Before(t.ExpiresAt) {
			return ErrTokenExpired
		}
		if t.DeviceID != deviceID {
			return ErrTokenDevice
		}
		switch err := get(txn, pfxDevice+deviceID, &dev); {
		case errors.Is(err, ErrNotFound):
			dev = fleet.Device{ID: deviceID, Group: t.Group, CreatedAt: now}
		case err != nil:
			return err
		}
		switch dev.State {
		case fleet.StateRevoked:
			return ErrDeviceRevoked
		case fleet.StateSuspended:
			return ErrDeviceSuspended
		}
		if dev.EKFingerprint != "" { // registered after the token was minted
			return ErrTPMBound
		}
		if _, taken := r.PrincipalRole(deviceID); taken {
			return fmt.Errorf("%w: %q is a service or operator name", ErrNameTaken, deviceID)
		}
		c, err := sign(TokenRedemption{Device: dev, Token: t})
		if err != nil {
			return err
		}
		t.UsedAt = now
		if err := put(txn, pfxToken+t.ID, &t); err != nil {
			return err
		}
		if t.Group != "" {
			dev.Group = t.Group
		}
		dev.State = fleet.StateActive
		dev.AttestationMethod = fleet.MethodToken
		if err := r.recordCert(txn, c, &dev, now); err != nil {
			return err
		}
		if err := r.putIssuedAudit(txn, audit, c.Serial); err != nil {
			return err
		}
		out = c
		return nil
	})
	if err != nil {
		return nil, err
	}
	r.dir.Issued(out, &dev)
	return out, nil
}

// ---- certificates ----

// RecordCertificate records a certificate that does not belong to a device
// (service, operator).
func (r *Registry) RecordCertificate(c *fleet.Certificate) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	if c.Role == identity.RoleDevice {
		return errors.New("registry: device certificates are recorded by enrollment")
	}
	if _, taken := r.DeviceStatus(c.Name); taken {
		return fmt.Errorf("%w: %q is a device ID", ErrNameTaken, c.Name)
	}
	if err := r.update(func(txn *badger.Txn) error { return r.recordCert(txn, c, nil, r.now()) }); err != nil {
		return err
	}
	r.dir.Issued(c, nil)
	return nil
}

func (r *Registry) recordCert(txn *badger.Txn, c *fleet.Certificate, dev *fleet.Device, now time.Time) error {
	if _, err := txn.Get([]byte(pfxCert + c.Serial)); err == nil {
		return fmt.Errorf("%w: %s", ErrDuplicateSerial, c.Serial)
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return err
	}
	c.IssuedAt = now
	if err := put(txn, pfxCert+c.Serial, c); err != nil {
		return err
	}
	if dev != nil {
		dev.CurrentSerial = c.Serial
		dev.NotAfter = c.NotAfter
		dev.UpdatedAt = now
		if err := put(txn, pfxDevice+dev.ID, dev); err != nil {
			return err
		}
		// Index certificates by device for revocation.
		if err := txn.Set([]byte("devcert/"+dev.ID+"/"+c.Serial), nil); err != nil {
			return err
		}
	}
	return nil
}

// Certificate returns the record of serial.
func (r *Registry) Certificate(serial string) (*fleet.Certificate, error) {
	var c fleet.Certificate
	if err := r.db.View(func(txn *badger.Txn) error { return get(txn, pfxCert+serial, &c) }); err != nil {
		return nil, err
	}
	return &c, nil
}

// ---- devices ----

// Device returns the record of id.
func (r *Registry) Device(id string) (*fleet.Device, error) {
	var d fleet.Device
	if err := r.db.View(func(txn *badger.Txn) error { return get(txn, pfxDevice+id, &d) }); err != nil {
		return nil, err
	}
	return &d, nil
}

// Devices lists all devices, sorted by ID.
func (r *Registry) Devices() ([]fleet.Device, error) {
	var out []fleet.Device
	err := r.db.View(func(txn *badger.Txn) error {
		return iterate(txn, pfxDevice, func(d *fleet.Device) error { out = append(out, *d); return nil })
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}

// ---- helpers ----

func (r *Registry) update(fn func(*badger.Txn) error) error {
	err := r.db.Update(fn)
	if errors.Is(err, badger.ErrConflict) {
		return ErrConflict
	}
	return err
}

func get(txn *badger.Txn, key string, v any) error {
	it, err := txn.Get([]byte(key))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return ErrNotFound
	}
	if err != nil {
		return fmt.Errorf("registry: get %s: %w", strings.SplitN(key, "/", 2)[0], err)
	}
	return it.Value(func(b []byte) error { return json.Unmarshal(b, v) })
}

func put(txn *badger.Txn, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("registry: encode: %w", err)
	}
	return txn.Set([]byte(key), b)
}

func iterate[T any](txn *badger.Txn, prefix string, fn func(*T) error) error {
	it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefix), PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		if !bytes.HasPrefix(it.Item().Key(), []byte(prefix)) {
			break
		}
		var v T
		if err := it.Item().Value(func(b []byte) error { return json.Unmarshal(b, &v) }); err != nil {
			return fmt.Errorf("registry: decode %s: %w", it.Item().Key(), err)
		}
		if err := fn(&v); err != nil {
			return err
		}
	}
	return nil
}

func outcome(err error) string {
	if err != nil {
		return OutcomeDenied
	}
	return OutcomeOK
}

func reason(err error) string {
	if err != nil {
		return err.Error()
	}
	return ""
}
