// Package kvtx is the registry's transactional key-value store, as the
// single box and a cluster both provide it: badger (Badger) on one
// machine, a JetStream KV bucket (JetStream) across nodes. Its one
// concurrency primitive is a compare-and-swap on a key's revision, in
// atomic batches: every operation of a Commit names the revision it
// expects the key to have, and either all of them apply or none does. One
// conformance suite (kvtxtest) runs against both implementations.
package kvtx

import (
	"context"
	"errors"
	"fmt"
	"regexp"
)

var (
	// ErrNotFound: the key was never written, or was deleted.
	ErrNotFound = errors.New("kvtx: key not found")
	// ErrRevision: an operation's expected revision is not the key's; the
	// batch was not applied.
	ErrRevision = errors.New("kvtx: revision mismatch")
	// ErrKey: a key outside the common syntax.
	ErrKey = errors.New("kvtx: invalid key")
)

// Entry is a key's current value and the revision of the write that set
// it. Revisions grow with every commit of the store.
type Entry struct {
	Key   string
	Value []byte
	Rev   uint64
}

// Op is one write of a Commit.
type Op struct {
	Key string
	// Value is the new value (ignored with Delete).
	Value  []byte
	Delete bool
	// Expect is the revision the key must have: that of its last write,
	// deletions included (Get returns it with ErrNotFound for a deleted
	// key); 0 for a key never written.
	Expect uint64
	// Any skips the check of Expect.
	Any bool
}

// Store is safe for concurrent use, also from several processes on one
// store (JetStream).
type Store interface {
	// Get returns the key's entry. For a deleted key it returns
	// ErrNotFound with the revision of the deletion in Entry.Rev.
	Get(ctx context.Context, key string) (Entry, error)
	// Commit applies ops atomically, in order: all, or none when one's
	// expected revision does not match (ErrRevision). It returns the
	// revision of each write. A key appears at most once in a batch.
	Commit(ctx context.Context, ops ...Op) ([]uint64, error)
	// List returns the live entries whose key starts with prefix ("" or
	// ending in "."), sorted by key.
	List(ctx context.Context, prefix string) ([]Entry, error)
}

// keyRE is what both implementations accept: NATS subject tokens (the
// characters JetStream KV allows) separated by dots.
var keyRE = regexp.MustCompile(`^[A-Za-z0-9_=/-]+(\.[A-Za-z0-9_=/-]+)*$`)

// CheckKey refuses a key outside the common syntax.
func CheckKey(key string) error {
	if len(key) > 512 || !keyRE.MatchString(key) {
		return fmt.Errorf("%w: %q", ErrKey, key)
	}
	return nil
}

func checkBatch(ops []Op) error {
	if len(ops) == 0 {
		return errors.New("kvtx: empty commit")
	}
	seen := make(map[string]bool, len(ops))
	for _, op := range ops {
		if err := CheckKey(op.Key); err != nil {
			return err
		}
		if seen[op.Key] {
			return fmt.Errorf("kvtx: key %q twice in one commit", op.Key)
		}
		seen[op.Key] = true
	}
	return nil
}

func checkPrefix(prefix string) error {
	if prefix == "" {
		return nil
	}
	if prefix[len(prefix)-1] != '.' || CheckKey(prefix[:len(prefix)-1]) != nil {
		return fmt.Errorf("%w: prefix %q", ErrKey, prefix)
	}
	return nil
}

// Log is what a store offers to read its writes in revision order (the
// registry's audit log, whose records are keys written once). Both
// implementations have it.
type Log interface {
	// Scan calls fn with the live entries under prefix ("" or ending in
	// ".") whose revision is in [from, to), in revision order; an error
	// of fn stops it.
	Scan(ctx context.Context, prefix string, from, to uint64, fn func(Entry) error) error
	// LastRev is the revision of the store's last write (0: none).
	LastRev(ctx context.Context) (uint64, error)
}
