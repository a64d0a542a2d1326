package kvtx

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	badger "github.com/dgraph-io/badger/v4"
)

// Badger is the single box's Store, inside a badger database under a key
// prefix. A stored value is its revision (8 bytes, big-endian), a flag (1:
// live, 0: deleted) and the value; the store's last revision is its own
// key. Commits are serialised by a mutex, so the expectations checked are
// those of the last commit.
type Badger struct {
	db     *badger.DB
	prefix []byte
	mu     sync.Mutex
}

// NewBadger returns a Store in db under prefix (db is not closed by the
// store).
func NewBadger(db *badger.DB, prefix string) *Badger {
	return &Badger{db: db, prefix: []byte(prefix)}
}

func (b *Badger) key(k string) []byte { return append(append([]byte{}, b.prefix...), "k/"+k...) }
func (b *Badger) revKey() []byte      { return append(append([]byte{}, b.prefix...), "rev"...) }

type stored struct {
	rev  uint64
	live bool
	val  []byte
}

func read(txn *badger.Txn, k []byte) (stored, error) {
	it, err := txn.Get(k)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return stored{}, nil
	}
	if err != nil {
		return stored{}, err
	}
	v, err := it.ValueCopy(nil)
	if err != nil {
		return stored{}, err
	}
	if len(v) < 9 {
		return stored{}, fmt.Errorf("kvtx: stored value of %q is %d bytes", k, len(v))
	}
	return stored{rev: binary.BigEndian.Uint64(v), live: v[8] == 1, val: v[9:]}, nil
}

func encode(rev uint64, live bool, val []byte) []byte {
	b := make([]byte, 9+len(val))
	binary.BigEndian.PutUint64(b, rev)
	if live {
		b[8] = 1
	}
	copy(b[9:], val)
	return b
}

// Get implements Store.
func (b *Badger) Get(_ context.Context, key string) (Entry, error) {
	if err := CheckKey(key); err != nil {
		return Entry{}, err
	}
	var s stored
	err := b.db.View(func(txn *badger.Txn) error {
		var err error
		s, err = read(txn, b.key(key))
		return err
	})
	if err != nil {
		return Entry{}, err
	}
	if !s.live {
		return Entry{Key: key, Rev: s.rev}, ErrNotFound
	}
	return Entry{Key: key, Value: s.val, Rev: s.rev}, nil
}

// Commit implements Store.
func (b *Badger) Commit(_ context.Context, ops ...Op) ([]uint64, error) {
	if err := checkBatch(ops); err != nil {
		return nil, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	revs := make([]uint64, len(ops))
	err := b.db.Update(func(txn *badger.Txn) error {
		last := uint64(0)
		switch it, err := txn.Get(b.revKey()); {
		case err == nil:
			if err := it.Value(func(v []byte) error {
				if len(v) != 8 {
					return fmt.Errorf("kvtx: revision is %d bytes", len(v))
				}
				last = binary.BigEndian.Uint64(v)
				return nil
			}); err != nil {
				return err
			}
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		for i, op := range ops {
			s, err := read(txn, b.key(op.Key))
			if err != nil {
				return err
			}
			if !op.Any && s.rev != op.Expect {
				return fmt.Errorf("%w: %s is at %d, not %d", ErrRevision, op.Key, s.rev, op.Expect)
			}
			revs[i] = last + 1 + uint64(i)
			if err := txn.Set(b.key(op.Key), encode(revs[i], !op.Delete, op.Value)); err != nil {
				return err
			}
		}
		return txn.Set(b.revKey(), binary.BigEndian.AppendUint64(nil, last+uint64(len(ops))))
	})
	if err != nil {
		return nil, err
	}
	return revs, nil
}

// List implements Store.
func (b *Badger) List(_ context.Context, prefix string) ([]Entry, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	var out []Entry
	p := b.key(prefix)
	kp := len(b.key(""))
	err := b.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: p, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			k := it.Item().Key()
			if !bytes.HasPrefix(k, p) {
				break
			}
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			if len(v) < 9 {
				return fmt.Errorf("kvtx: stored value of %q is %d bytes", k, len(v))
			}
			if v[8] == 1 {
				out = append(out, Entry{Key: string(k[kp:]), Value: v[9:], Rev: binary.BigEndian.Uint64(v)})
			}
		}
		return nil
	})
	return out, err
}

// Scan implements Log. It lists the prefix (badger keeps no index by
// revision): for tests and small stores.
func (b *Badger) Scan(ctx context.Context, prefix string, from, to uint64, fn func(Entry) error) error {
	all, err := b.List(ctx, prefix)
	if err != nil {
		return err
	}
	slices.SortFunc(all, func(x, y Entry) int { return cmp.Compare(x.Rev, y.Rev) })
	for _, e := range all {
		if e.Rev >= from && e.Rev < to {
			if err := fn(e); err != nil {
				return err
			}
		}
	}
	return nil
}

// LastRev implements Log.
func (b *Badger) LastRev(context.Context) (uint64, error) {
	var last uint64
	err := b.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(b.revKey())
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error {
			if len(v) != 8 {
				return fmt.Errorf("kvtx: revision is %d bytes", len(v))
			}
			last = binary.BigEndian.Uint64(v)
			return nil
		})
	})
	return last, err
}
