package registry

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Two registries (two nodes, each its own badger) sharing one store: a
// token created on one is redeemed on either, and of concurrent
// redemptions on both exactly one issues. (The same against JetStream
// across three nodes: e2e TestClusterTokenSingleUseAcrossNodes.)
func TestSharedTokenSingleUseAcrossRegistries(t *testing.T) {
	db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	shared := kvtx.NewBadger(db, "shared/")
	nodes := make([]*Registry, 2)
	for i := range nodes {
		r, err := Open(t.TempDir(), Options{Shared: shared})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		nodes[i] = r
	}
	for round := range 20 {
		id, secret := fmt.Sprintf("shared-%d", round), []byte(fmt.Sprint("secret-", round))
		tokID := fmt.Sprintf("a1b2%04x", round)
		if err := nodes[round%2].CreateToken(Token{ID: tokID, Hash: HashTokenSecret(secret), DeviceID: id, Group: "g", ExpiresAt: time.Now().Add(time.Hour)}, "test"); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var issued, used int
		for n := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := nodes[n].RedeemToken(tokID, secret, id, func(TokenRedemption) (*fleet.Certificate, error) {
					return &fleet.Certificate{Serial: fmt.Sprintf("%x%02x", round+1, n), Role: identity.RoleDevice, Name: id, NotAfter: time.Now().Add(time.Hour)}, nil
				})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					issued++
				case errors.Is(err, ErrTokenUsed):
					used++
				default:
					t.Errorf("redeem on node %d: %v", n, err)
				}
			}()
		}
		wg.Wait()
		if issued != 1 || used != 1 {
			t.Fatalf("round %d: %d certificates issued, %d refused as used; want 1 and 1", round, issued, used)
		}
	}
	// A wrong secret stays unknown, whichever node is asked.
	if _, err := nodes[1].RedeemToken("a1b20000", []byte("wrong"), "shared-0", nil); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("wrong secret: %v", err)
	}
	if _, err := nodes[0].RedeemToken("no-such.token", []byte("x"), "x", nil); !errors.Is(err, ErrTokenUnknown) {
		t.Fatalf("unknown token: %v", err)
	}
}
