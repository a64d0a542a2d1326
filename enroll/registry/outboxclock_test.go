package registry

import (
	"fmt"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
)

// The outbox drain ages a record by the draining node's own observation
// of it (how long it has seen the record unchanged, at one revision),
// never by the committing node's clock: a node whose clock runs ahead
// does not keep its committed, unpublished revocation out of the
// cluster's directory for as long as the skew. (Found by the security
// review; it failed when the drain compared the writer's timestamp with
// its own clock.)
func TestOutboxDrainIndependentOfTheWritersClock(t *testing.T) {
	if suite.name != "jetstream" {
		t.Skip("needs the JetStream pass")
	}
	for _, skew := range []time.Duration{0, 30 * time.Minute} {
		t.Run(fmt.Sprintf("skew=%s", skew), func(t *testing.T) {
			bucket := newBucket()
			// Node A: its clock runs ahead; it commits and never publishes
			// (no publisher: a node that stopped after its commit).
			a, err := Open(t.TempDir(), Options{Shared: sharedStore(t, bucket, 0), Logger: suiteLogger(),
				Now: func() time.Time { return time.Now().Add(skew) }})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { a.Close() })
			id := fmt.Sprintf("skew-%d", int(skew.Seconds()))
			enrollOn(t, a, a, id)
			if _, err := a.RevokeDevice(id, "stolen", "op"); err != nil {
				t.Fatal(err)
			}
			// Node B drains the outbox (every 100 ms, records older than 1 s).
			b := startFeedNode(t, bucket, 1, nil)
			deadline := time.Now().Add(30 * time.Second)
			for {
				if st, ok := b.dir.DeviceStatus(id); ok && st.State == fleet.StateRevoked {
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("node A's clock %s ahead: its committed revocation of %s never reached the cluster's directory through the outbox drain", skew, id)
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}
