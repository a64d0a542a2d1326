package registry

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/dirfeed"
	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
)

// feedNode is a cluster node as server/cluster.go wires it: a registry on
// the shared bucket, a directory fed by the cluster's directory bucket,
// the feed publishing the registry's commits (SetPublisher).
type feedNode struct {
	reg  *Registry
	dir  *directory.Directory
	feed *dirfeed.Feed
	stop func()
}

func startFeedNode(t *testing.T, bucket, i int, reg *Registry) *feedNode {
	t.Helper()
	nc := suite.conns[i%len(suite.conns)]
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	bctx, bcancel := context.WithTimeout(ctx, 60*time.Second)
	kv, err := natsnode.Bucket(bctx, js, dirfeed.Bucket)
	bcancel()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	store, err := kvtx.NewJetStream(ctx, nc, js, kv)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	n := &feedNode{reg: reg, dir: directory.New()}
	if reg == nil {
		if n.reg, err = Open(t.TempDir(), Options{Shared: sharedStore(t, bucket, i), Directory: n.dir, DirectoryFed: true, Logger: suiteLogger()}); err != nil {
			cancel()
			t.Fatal(err)
		}
	}
	n.feed = dirfeed.New(dirfeed.Config{NC: nc, KV: kv, Store: store, Dir: n.dir, Node: fmt.Sprintf("outbox%d-%d", bucket, i),
		OnDevice: func(id string, st fleet.DeviceState) { _ = n.reg.ApplyClusterState(id, st) }})
	n.reg.SetPublisher(n.feed.PublishRecord)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); n.feed.Run(ctx) }()
	go func() { defer wg.Done(); n.reg.RunOutbox(ctx, 100*time.Millisecond, time.Second) }()
	var once sync.Once
	n.stop = func() { once.Do(func() { cancel(); wg.Wait(); n.reg.Close() }) }
	t.Cleanup(n.stop)
	select {
	case <-n.feed.Synced():
	case <-time.After(60 * time.Second):
		t.Fatalf("node %d: directory never synced", i)
	}
	return n
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 600 { // 60 s: the machine is loaded
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("not within 60 s: %s", what)
}

var errCrash = errors.New("test: the node stopped after its commit")

// crashAfterNextCommit makes the next commit on a shared store stop
// after it committed and before its outbox is published (errCrash), as a
// node that died between the two steps.
func crashAfterNextCommit(t *testing.T) {
	var armed atomic.Bool
	armed.Store(true)
	hook := func() error {
		if armed.CompareAndSwap(true, false) {
			return errCrash
		}
		return nil
	}
	testHookAfterCommit.Store(&hook)
	t.Cleanup(func() { testHookAfterCommit.Store(nil) })
}

// A node commits a revocation and stops before publishing it into the
// cluster's directory bucket (testHookAfterCommit). The revocation is in
// the shared records and in the commit's outbox record: another node
// drains it, publishes it, and completes it (the device's certificates
// revoked in the records), so every directory, that node's and a node
// started afterwards, refuses the device. Without the outbox, nothing
// ever brings the revocation to the bucket.
func TestClusterRevocationCommittedBeforeACrashReachesEveryNode(t *testing.T) {
	if suite.name != "jetstream" {
		t.Skip("needs the JetStream pass")
	}
	bucket := newBucket()
	a := startFeedNode(t, bucket, 0, nil)
	b := startFeedNode(t, bucket, 1, nil)
	c := enrollOn(t, a.reg, a.reg, "crash-1")
	eventually(t, "node 2's directory has the enrolled device", func() bool {
		st, ok := b.dir.DeviceStatus("crash-1")
		cs, cok := b.dir.CertStatus(c.Serial)
		return ok && st.State == fleet.StateActive && cok && !cs.Revoked
	})

	crashAfterNextCommit(t)
	if _, err := a.reg.RevokeDevice("crash-1", "stolen", "op"); !errors.Is(err, errCrash) {
		t.Fatalf("revocation on node 1: %v, want the simulated crash", err)
	}
	a.stop() // node 1 is gone
	// Committed: the shared records say revoked.
	d, err := b.reg.Device("crash-1")
	if err != nil || d.State != fleet.StateRevoked {
		t.Fatalf("device in the shared records after the crash: %+v %v", d, err)
	}

	eventually(t, "node 2's directory refuses the revoked device", func() bool {
		st, _ := b.dir.DeviceStatus("crash-1")
		cs, _ := b.dir.CertStatus(c.Serial)
		return st.State == fleet.StateRevoked && cs.Revoked
	})
	cert, err := b.reg.Certificate(c.Serial)
	if err != nil || !cert.Revoked {
		t.Fatalf("certificate in the shared records: revoked %v (%v), want completed by node 2", cert != nil && cert.Revoked, err)
	}
	// A node started now learns it from the bucket alone.
	fresh := startFeedNode(t, bucket, 2, nil)
	eventually(t, "a fresh node's directory refuses the revoked device", func() bool {
		st, _ := fresh.dir.DeviceStatus("crash-1")
		cs, _ := fresh.dir.CertStatus(c.Serial)
		return st.State == fleet.StateRevoked && cs.Revoked
	})
	// The outbox is empty once drained.
	eventually(t, "the outbox drained", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		left, err := b.reg.kv.List(ctx, pfxOutbox)
		return err == nil && len(left) == 0
	})
}
