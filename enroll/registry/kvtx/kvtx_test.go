package kvtx_test

import (
	"context"
	"testing"
	"time"

	badger "github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx/kvtxtest"
)

func TestBadgerConformance(t *testing.T) {
	db, err := badger.Open(badger.DefaultOptions(t.TempDir()).WithLogger(nil).WithSyncWrites(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s := kvtx.NewBadger(db, "kvtx/")
	kvtxtest.Run(t, func(int) kvtx.Store { return s })
}

// The same suite against a bucket of a 3-node JetStream cluster, one
// client on each node.
func TestJetStreamConformance(t *testing.T) {
	c := natstest.Start(t, 3)
	stores := make([]kvtx.Store, 3)
	for i := range stores {
		nc := c.Connect(i)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		kv, err := natsnode.Bucket(ctx, js, "conformance")
		if err == nil {
			stores[i], err = kvtx.NewJetStream(ctx, nc, js, kv)
		}
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	kvtxtest.Run(t, func(i int) kvtx.Store { return stores[i] })
}
