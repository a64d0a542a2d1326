package registry

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// testIssuance writes key k when its check (refuse) and commit (fail) let
// it.
func testIssuance(k string, refuse, fail error) (issuance, *fleet.Certificate) {
	return issuance{
		check: func(txn, time.Time) error { return refuse },
		commit: func(txn txn, _ *fleet.Certificate, _ time.Time) (*fleet.Device, error) {
			if err := txn.set("test/"+k, []byte(k)); err != nil {
				return nil, err
			}
			return nil, fail
		},
	}, &fleet.Certificate{Serial: k, Role: identity.RoleDevice, Name: "dev-" + k, NotAfter: time.Now().Add(time.Hour)}
}

func testKeys(t *testing.T, r *Registry, keys ...string) map[string]bool {
	t.Helper()
	got := map[string]bool{}
	if err := r.view(func(txn txn) error {
		for _, k := range keys {
			_, err := txn.getRaw("test/" + k)
			got[k] = err == nil
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return got
}

// A batch commits each issuance as it would alone: a refused one writes
// nothing and gets its error; a failed commit sends each back alone.
func TestGroupCommitBatch(t *testing.T) {
	r := openTest(t)
	refused, failed := errors.New("refused"), errors.New("commit failed")
	mk := func(k string, refuse, fail error) *issueCommit {
		is, c := testIssuance(k, refuse, fail)
		return &issueCommit{is: is, c: c, wake: make(chan struct{})}
	}
	batch := []*issueCommit{mk("a", nil, nil), mk("b", refused, nil), mk("c", nil, nil)}
	r.commitBatch(batch)
	if batch[0].err != nil || !errors.Is(batch[1].err, refused) || batch[2].err != nil {
		t.Fatalf("errors %v, %v, %v", batch[0].err, batch[1].err, batch[2].err)
	}
	if got := testKeys(t, r, "a", "b", "c"); !got["a"] || got["b"] || !got["c"] {
		t.Fatalf("written: %v, want a and c", got)
	}
	batch = []*issueCommit{mk("d", nil, nil), mk("e", nil, failed), mk("f", nil, nil)}
	r.commitBatch(batch)
	if batch[0].err != nil || !errors.Is(batch[1].err, failed) || batch[2].err != nil {
		t.Fatalf("errors %v, %v, %v", batch[0].err, batch[1].err, batch[2].err)
	}
	if got := testKeys(t, r, "d", "e", "f"); !got["d"] || got["e"] || !got["f"] {
		t.Fatalf("written: %v, want d and f", got)
	}
}

// Concurrent redemptions, grouped into shared transactions: each token is
// redeemed once, every certificate is recorded with its audit record
// before it is returned, and the audit sequence has no duplicate.
func TestGroupCommitConcurrentRedemptions(t *testing.T) {
	r := openTest(t)
	const n = 48
	secrets := make([][]byte, n)
	for i := range n {
		secrets[i] = []byte(fmt.Sprintf("secret-%02d", i))
		if err := r.CreateToken(Token{ID: fmt.Sprintf("tok%02d", i), Hash: HashTokenSecret(secrets[i]), DeviceID: fmt.Sprintf("dev-%02d", i%(n/2)),
			CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 2*n)
	for i := range 2 * n { // each token twice
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := i % n
			dev := fmt.Sprintf("dev-%02d", k%(n/2))
			_, errs[i] = r.RedeemTokenAudited(fmt.Sprintf("tok%02d", k), secrets[k], dev, &AuditRecord{Actor: "device", Action: "enroll.token", DeviceID: dev},
				func(tr TokenRedemption) (*fleet.Certificate, error) {
					return &fleet.Certificate{Serial: fmt.Sprintf("%02x%d", k, i), Role: identity.RoleDevice, Name: dev, NotAfter: time.Now().Add(time.Hour)}, nil
				})
		}()
	}
	wg.Wait()
	for k := range n {
		a, b := errs[k], errs[k+n]
		if (a == nil) == (b == nil) {
			t.Fatalf("token %d: redemptions %v and %v, want exactly one", k, a, b)
		}
		if err := errors.Join(a, b); !errors.Is(err, ErrTokenUsed) && !errors.Is(err, ErrConflict) {
			t.Fatalf("token %d: refused with %v", k, err)
		}
		serial := fmt.Sprintf("%02x%d", k, k)
		if a != nil {
			serial = fmt.Sprintf("%02x%d", k, k+n)
		}
		if _, err := r.Certificate(serial); err != nil {
			t.Fatalf("certificate %s of token %d: %v", serial, k, err)
		}
	}
	seen := map[uint64]bool{}
	recs, err := r.AuditLog("", 10*n)
	if err != nil {
		t.Fatal(err)
	}
	ok := 0
	for _, a := range recs {
		if seen[a.Seq] {
			t.Fatalf("audit sequence %d twice", a.Seq)
		}
		seen[a.Seq] = true
		if a.Action == "enroll.token" && a.Outcome == OutcomeOK {
			ok++
		}
	}
	if ok != n {
		t.Fatalf("%d audit records of enrollments, want %d", ok, n)
	}
}
