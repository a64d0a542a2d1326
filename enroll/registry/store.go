package registry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	badger "github.com/dgraph-io/badger/v4"
)

// txn is one registry transaction over the record store: badger's own
// transaction on the single box (badgerTxn, keys as they always were), or
// an optimistic transaction over a kvtx.Store in a cluster (kvTxn,
// kvstore.go). The registry's logic is written once against it.
//
// Keys are the registry's ("dev/<id>", "devcert/<id>/<serial>"); kvTxn
// writes them with "." for "/" (kvtx keys are dot-separated tokens).
type txn interface {
	// getRaw returns the key's value, ErrNotFound if there is none.
	getRaw(key string) ([]byte, error)
	// set writes the key (visible to later reads of the transaction).
	set(key string, val []byte) error
	// del deletes the key.
	del(key string) error
	// scan calls fn with every key under prefix (which ends in "/"), in
	// key order, with the key's rest after the prefix.
	scan(prefix string, fn func(rest string, val []byte) error) error
	// guard makes the commit fail (ErrConflict) if key, read in this
	// transaction, changed before the commit. badger checks every read
	// (serializable snapshot isolation); a kvtx commit checks the keys it
	// writes and the guarded ones.
	guard(key string)
}

// badgerTxn is a txn on badger.
type badgerTxn struct{ t *badger.Txn }

func (b badgerTxn) getRaw(key string) ([]byte, error) {
	it, err := b.t.Get([]byte(key))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("registry: get %s: %w", strings.SplitN(key, "/", 2)[0], err)
	}
	return it.ValueCopy(nil)
}

func (b badgerTxn) set(key string, val []byte) error { return b.t.Set([]byte(key), val) }
func (b badgerTxn) del(key string) error             { return b.t.Delete([]byte(key)) }
func (b badgerTxn) guard(string)                     {}

func (b badgerTxn) scan(prefix string, fn func(string, []byte) error) error {
	it := b.t.NewIterator(badger.IteratorOptions{Prefix: []byte(prefix), PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		k := it.Item().Key()
		if !bytes.HasPrefix(k, []byte(prefix)) {
			break
		}
		v, err := it.Item().ValueCopy(nil)
		if err != nil {
			return fmt.Errorf("registry: read %s: %w", k, err)
		}
		if err := fn(string(k[len(prefix):]), v); err != nil {
			return err
		}
	}
	return nil
}

// view runs fn in a read-only transaction of the record store.
func (r *Registry) view(fn func(txn) error) error {
	if r.kv != nil {
		return r.kvView(fn)
	}
	return badgerClosed(r.db.View(func(t *badger.Txn) error { return fn(badgerTxn{t}) }))
}

// badgerClosed makes a closed badger (a registry being shut down) the
// same ErrUnavailable as a cluster store without quorum: the APIs answer
// 503 with Retry-After, not 500.
func badgerClosed(err error) error {
	if errors.Is(err, badger.ErrDBClosed) {
		return unavailable(err)
	}
	return err
}

// update runs fn in a read-write transaction of the record store and
// commits it; ErrConflict if a concurrent transaction changed what it read.
func (r *Registry) update(fn func(txn) error) error {
	if r.kv != nil {
		return r.kvUpdate(fn)
	}
	err := r.db.Update(func(t *badger.Txn) error { return fn(badgerTxn{t}) })
	if errors.Is(err, badger.ErrConflict) {
		return ErrConflict
	}
	return badgerClosed(err)
}

func get(txn txn, key string, v any) error {
	b, err := txn.getRaw(key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("registry: decode %s: %w", key, err)
	}
	return nil
}

// exists reports whether key has a value.
func exists(txn txn, key string) (bool, error) {
	_, err := txn.getRaw(key)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrNotFound):
		return false, nil
	}
	return false, err
}

func put(txn txn, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("registry: encode: %w", err)
	}
	return txn.set(key, b)
}

func iterate[T any](txn txn, prefix string, fn func(*T) error) error {
	return txn.scan(prefix, func(rest string, b []byte) error {
		var v T
		if err := json.Unmarshal(b, &v); err != nil {
			return fmt.Errorf("registry: decode %s%s: %w", prefix, rest, err)
		}
		return fn(&v)
	})
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
