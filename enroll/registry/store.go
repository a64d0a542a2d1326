package registry

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	badger "github.com/dgraph-io/badger/v4"
)

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
