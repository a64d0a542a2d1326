package natsnode_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

func bucket(t *testing.T, c *natstest.Cluster, i int) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(c.Connect(i))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := natsnode.Bucket(ctx, js, "t")
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// Three embedded nodes replicate a bucket at R3 with sync always; a node
// cut off from the others can neither write nor read the bucket's new
// values, and has them after the heal.
func TestThreeNodesReplicateAndAPartitionedNodeCannotWrite(t *testing.T) {
	c := natstest.Start(t, 3)
	if !c.Nodes[0].Server().JetStreamConfig().SyncAlways {
		t.Fatal("JetStream does not sync before it acknowledges")
	}
	kv0, kv2 := bucket(t, c, 0), bucket(t, c, 2)
	st, err := kv0.Status(context.Background())
	if err != nil || st.(*jetstream.KeyValueBucketStatus).StreamInfo().Config.Replicas != 3 {
		t.Fatalf("bucket status %v, %v; want 3 replicas", st, err)
	}
	ctx := context.Background()
	if _, err := kv0.Put(ctx, "k", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	waitValue(t, kv2, "k", "v1")

	c.Cut(2)
	// Node 2 is alone: its writes are not acknowledged (no quorum).
	cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	_, err = kv2.Put(cctx, "k2", []byte("minority"))
	cancel()
	if err == nil {
		t.Fatal("a write on a node cut off from the quorum was acknowledged")
	}
	// The majority goes on.
	deadline := time.Now().Add(20 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := kv0.Put(cctx, "k", []byte("v2"))
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the majority cannot write after the cut: %v", err)
		}
	}
	c.Heal(2)
	waitValue(t, kv2, "k", "v2")
}

func waitValue(t *testing.T, kv jetstream.KeyValue, key, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		e, err := kv.Get(ctx, key)
		cancel()
		if err == nil && string(e.Value()) == want {
			return
		}
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, context.DeadlineExceeded) {
			t.Logf("get %s: %v", key, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never became %q (last: %v)", key, want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// An external NATS (Dial) that cannot hold three replicas is refused.
func TestBucketNeedsThreeServers(t *testing.T) {
	srv := startServer(t, &server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true,
		StoreDir: t.TempDir(), NoSigs: true})
	nc, err := natsnode.Dial(srv.ClientURL(), "t", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if _, err := natsnode.Bucket(ctx, js, "t"); err == nil {
		t.Fatal("an R3 bucket on a single server")
	}
}
