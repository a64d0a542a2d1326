package natsnode_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

// A bucket opened with Bucket has direct gets off (reads go to the
// stream's leader) and atomic batches on, whether Bucket created it or
// nats.go's CreateKeyValue did before (with AllowDirect, as it always
// sets); a compare-and-swap through it sees every revision it wrote.
func TestBucketReadsFromTheLeader(t *testing.T) {
	c := natstest.Start(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	js, err := jetstream.New(c.Connect(1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "old", History: 1,
		Replicas: natsnode.Replicas, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	if st, err := js.Stream(ctx, "KV_old"); err != nil || !st.CachedInfo().Config.AllowDirect {
		t.Fatalf("nats.go's bucket: %v; want AllowDirect as the premise of this test", err)
	}
	for _, name := range []string{"old", "new"} {
		kv, err := natsnode.Bucket(ctx, js, name)
		if err != nil {
			t.Fatal(err)
		}
		st, err := js.Stream(ctx, "KV_"+name)
		if err != nil {
			t.Fatal(err)
		}
		if cfg := st.CachedInfo().Config; cfg.AllowDirect || !cfg.AllowAtomicPublish {
			t.Fatalf("bucket %s: AllowDirect %v, AllowAtomicPublish %v; want false, true", name, cfg.AllowDirect, cfg.AllowAtomicPublish)
		}
		// Opened again (another node's start), it stays so.
		if _, err := natsnode.Bucket(ctx, js, name); err != nil {
			t.Fatal(err)
		}
		if st, err := js.Stream(ctx, "KV_"+name); err != nil || st.CachedInfo().Config.AllowDirect {
			t.Fatalf("bucket %s reopened: %v, AllowDirect back on", name, err)
		}
		// Read, swap, read: each read has the revision just written.
		rev, err := kv.Create(ctx, "k", []byte("0"))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 30 {
			e, err := kv.Get(ctx, "k")
			if err != nil || e.Revision() != rev {
				t.Fatalf("bucket %s swap %d: read %v, %v; want revision %d", name, i, e, err, rev)
			}
			if rev, err = kv.Update(ctx, "k", []byte{byte('a' + i)}, rev); err != nil {
				t.Fatalf("bucket %s swap %d: %v", name, i, err)
			}
		}
	}
}
