// Package kvtxtest is the conformance suite of kvtx.Store: every
// implementation (badger, JetStream) runs it, so the registry can rely on
// the same semantics on one machine and across nodes.
package kvtxtest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
)

// Run runs the suite. open(i) returns a handle on the one store under
// test, through "node" i (0, 1, 2): the same store for a single box,
// clients on different nodes of a cluster. Each subtest uses keys of its
// own.
func Run(t *testing.T, open func(i int) kvtx.Store) {
	ctx := func(t *testing.T) context.Context {
		c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		t.Cleanup(cancel)
		return c
	}
	ns := func(t *testing.T) string {
		return strings.NewReplacer("/", "-", "_", "-").Replace(t.Name()) + "."
	}
	t.Run("create_get_update", func(t *testing.T) {
		s, c, p := open(0), ctx(t), ns(t)
		if e, err := s.Get(c, p+"a"); !errors.Is(err, kvtx.ErrNotFound) || e.Rev != 0 {
			t.Fatalf("missing key: %+v %v", e, err)
		}
		revs, err := s.Commit(c, kvtx.Op{Key: p + "a", Value: []byte("1")})
		if err != nil || len(revs) != 1 || revs[0] == 0 {
			t.Fatalf("create: %v %v", revs, err)
		}
		r1 := revs[0]
		other := open(1)
		if e, err := other.Get(c, p+"a"); err != nil || string(e.Value) != "1" || e.Rev != r1 {
			t.Fatalf("get through another handle: %+v %v, want 1 at %d", e, err, r1)
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "a", Value: []byte("x")}); !errors.Is(err, kvtx.ErrRevision) {
			t.Fatalf("second create: %v, want ErrRevision", err)
		}
		revs, err = other.Commit(c, kvtx.Op{Key: p + "a", Value: []byte("2"), Expect: r1})
		if err != nil || revs[0] <= r1 {
			t.Fatalf("update: %v %v", revs, err)
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "a", Value: []byte("stale"), Expect: r1}); !errors.Is(err, kvtx.ErrRevision) {
			t.Fatalf("update at a stale revision: %v, want ErrRevision", err)
		}
		if e, _ := s.Get(c, p+"a"); string(e.Value) != "2" || e.Rev != revs[0] {
			t.Fatalf("after a refused update: %+v", e)
		}
		if revs, err = s.Commit(c, kvtx.Op{Key: p + "a", Value: []byte("3"), Any: true}); err != nil {
			t.Fatalf("unconditional write: %v", err)
		}
		if e, _ := s.Get(c, p+"a"); string(e.Value) != "3" || e.Rev != revs[0] {
			t.Fatalf("after an unconditional write: %+v", e)
		}
	})
	t.Run("delete_and_recreate", func(t *testing.T) {
		s, c, p := open(0), ctx(t), ns(t)
		revs, err := s.Commit(c, kvtx.Op{Key: p + "d", Value: []byte("1")})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "d", Delete: true, Expect: revs[0] + 1000}); !errors.Is(err, kvtx.ErrRevision) {
			t.Fatalf("delete at a wrong revision: %v", err)
		}
		del, err := s.Commit(c, kvtx.Op{Key: p + "d", Delete: true, Expect: revs[0]})
		if err != nil {
			t.Fatal(err)
		}
		e, err := open(2).Get(c, p+"d")
		if !errors.Is(err, kvtx.ErrNotFound) || e.Rev != del[0] {
			t.Fatalf("deleted key: %+v %v, want ErrNotFound at %d", e, err, del[0])
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "d", Value: []byte("x")}); !errors.Is(err, kvtx.ErrRevision) {
			t.Fatalf("create over a deletion expecting a fresh key: %v", err)
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "d", Value: []byte("2"), Expect: del[0]}); err != nil {
			t.Fatalf("create at the deletion's revision: %v", err)
		}
	})
	t.Run("atomic_batch", func(t *testing.T) {
		s, c, p := open(0), ctx(t), ns(t)
		revs, err := s.Commit(c, kvtx.Op{Key: p + "x", Value: []byte("x1")})
		if err != nil {
			t.Fatal(err)
		}
		// One stale expectation, in the middle: nothing applies.
		_, err = s.Commit(c, kvtx.Op{Key: p + "new1", Value: []byte("n")},
			kvtx.Op{Key: p + "x", Value: []byte("x2"), Expect: revs[0] + 1000},
			kvtx.Op{Key: p + "new2", Value: []byte("n")})
		if !errors.Is(err, kvtx.ErrRevision) {
			t.Fatalf("batch with a stale expectation: %v", err)
		}
		for _, k := range []string{"new1", "new2"} {
			if e, err := s.Get(c, p+k); !errors.Is(err, kvtx.ErrNotFound) {
				t.Fatalf("%s written by a refused batch: %+v", k, e)
			}
		}
		if e, _ := s.Get(c, p+"x"); string(e.Value) != "x1" {
			t.Fatalf("x changed by a refused batch: %+v", e)
		}
		b, err := open(1).Commit(c, kvtx.Op{Key: p + "new1", Value: []byte("a")},
			kvtx.Op{Key: p + "x", Value: []byte("x2"), Expect: revs[0]},
			kvtx.Op{Key: p + "new2", Delete: true})
		if err != nil || len(b) != 3 || !(b[0] < b[1] && b[1] < b[2]) {
			t.Fatalf("batch: %v %v", b, err)
		}
		for i, k := range []string{"new1", "x"} {
			if e, err := s.Get(c, p+k); err != nil || e.Rev != b[i] {
				t.Fatalf("%s after the batch: %+v %v, want revision %d", k, e, err, b[i])
			}
		}
		if e, err := s.Get(c, p+"new2"); !errors.Is(err, kvtx.ErrNotFound) || e.Rev != b[2] {
			t.Fatalf("new2 deleted in the batch: %+v %v", e, err)
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "k", Value: []byte("1")}, kvtx.Op{Key: p + "k", Value: []byte("2"), Any: true}); err == nil {
			t.Fatal("a batch writing one key twice")
		}
	})
	t.Run("list", func(t *testing.T) {
		s, c, p := open(0), ctx(t), ns(t)
		for _, k := range []string{"b.2", "a.1", "b.1", "c"} {
			if _, err := s.Commit(c, kvtx.Op{Key: p + k, Value: []byte(k)}); err != nil {
				t.Fatal(err)
			}
		}
		e, _ := s.Get(c, p+"b.2")
		if _, err := s.Commit(c, kvtx.Op{Key: p + "b.2", Delete: true, Expect: e.Rev}); err != nil {
			t.Fatal(err)
		}
		got, err := open(2).List(c, p+"b.")
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got[0].Key != p+"b.1" || string(got[0].Value) != "b.1" || got[0].Rev == 0 {
			t.Fatalf("list b.: %+v", got)
		}
		all, err := s.List(c, p)
		if err != nil || len(all) != 3 || all[0].Key != p+"a.1" || all[2].Key != p+"c" {
			t.Fatalf("list: %+v %v", all, err)
		}
		if _, err := s.List(c, p+"b"); !errors.Is(err, kvtx.ErrKey) {
			t.Fatalf("a prefix not ending in a dot: %v", err)
		}
	})
	// A write is read back at once through any handle (JetStream: not
	// from a replica that has not applied it yet).
	t.Run("read_your_writes", func(t *testing.T) {
		c, p := ctx(t), ns(t)
		for i := range 60 {
			key := fmt.Sprintf("%sk%d", p, i)
			revs, err := open(i%3).Commit(c, kvtx.Op{Key: key, Value: []byte("v")})
			if err != nil {
				t.Fatal(err)
			}
			if e, err := open((i+1)%3).Get(c, key); err != nil || e.Rev != revs[0] {
				t.Fatalf("write %d read back through another handle: %+v %v, want revision %d", i, e, err, revs[0])
			}
		}
	})
	t.Run("keys", func(t *testing.T) {
		s, c := open(0), ctx(t)
		for _, k := range []string{"", "a..b", "a b", "a.*", "a.>", ".a", "a."} {
			if _, err := s.Commit(c, kvtx.Op{Key: k, Value: []byte("x")}); !errors.Is(err, kvtx.ErrKey) {
				t.Errorf("key %q: %v, want ErrKey", k, err)
			}
		}
	})
	// Log (the registry's audit log): entries in revision order, within
	// the range, deletions left out, through any handle.
	t.Run("log_scan", func(t *testing.T) {
		s, c, p := open(0), ctx(t), ns(t)
		if _, ok := s.(kvtx.Log); !ok {
			t.Skip("no kvtx.Log")
		}
		var revs []uint64
		for i, k := range []string{"z", "a", "m", "b"} {
			r, err := open(i%3).Commit(c, kvtx.Op{Key: p + "log." + k, Value: []byte(k)}, kvtx.Op{Key: fmt.Sprintf("%sother%d", p, i), Value: []byte("x")})
			if err != nil {
				t.Fatal(err)
			}
			revs = append(revs, r[0])
		}
		if _, err := s.Commit(c, kvtx.Op{Key: p + "log.m", Delete: true, Expect: revs[2]}); err != nil {
			t.Fatal(err)
		}
		scan := func(h kvtx.Store, from, to uint64) string {
			var got []string
			if err := h.(kvtx.Log).Scan(c, p+"log.", from, to, func(e kvtx.Entry) error {
				got = append(got, fmt.Sprintf("%s@%d", e.Key[len(p):], e.Rev))
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			return strings.Join(got, " ")
		}
		want := fmt.Sprintf("log.z@%d log.a@%d log.b@%d", revs[0], revs[1], revs[3])
		if got := scan(open(1), 1, ^uint64(0)); got != want {
			t.Fatalf("scan: %q, want %q", got, want)
		}
		if got, want := scan(open(2), revs[1], revs[3]), fmt.Sprintf("log.a@%d", revs[1]); got != want {
			t.Fatalf("scan [%d, %d): %q, want %q", revs[1], revs[3], got, want)
		}
		last, err := open(2).(kvtx.Log).LastRev(c)
		if err != nil || last <= revs[3] {
			t.Fatalf("last revision %d (%v), after %d", last, err, revs[3])
		}
	})
	// The property tokens rely on: of concurrent compare-and-swaps from
	// the same revision, through every node, exactly one wins.
	t.Run("concurrent_cas_one_winner", func(t *testing.T) {
		c, p := ctx(t), ns(t)
		s := open(0)
		for round := range 5 {
			key := fmt.Sprintf("%stok%d", p, round)
			revs, err := s.Commit(c, kvtx.Op{Key: key, Value: []byte("unused")})
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var mu sync.Mutex
			wins, lost := 0, 0
			for w := range 6 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := open(w%3).Commit(c, kvtx.Op{Key: key, Value: []byte(fmt.Sprint("used by ", w)), Expect: revs[0]},
						kvtx.Op{Key: fmt.Sprintf("%scert%d.%d", p, round, w), Value: []byte("issued")})
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						wins++
					case errors.Is(err, kvtx.ErrRevision):
						lost++
					default:
						t.Errorf("claim: %v", err)
					}
				}()
			}
			wg.Wait()
			certs, err := s.List(c, fmt.Sprintf("%scert%d.", p, round))
			if err != nil {
				t.Fatal(err)
			}
			if wins != 1 || lost != 5 || len(certs) != 1 {
				t.Fatalf("round %d: %d claims won, %d lost, %d certificates recorded; want 1, 5, 1", round, wins, lost, len(certs))
			}
		}
	})
}
