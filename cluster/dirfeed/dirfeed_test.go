package dirfeed_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/cluster/dirfeed"
	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

type node struct {
	dir  *directory.Directory
	feed *dirfeed.Feed
}

func start(t *testing.T, c *natstest.Cluster) []node {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	nodes := make([]node, len(c.Nodes))
	for i := range nodes {
		nc := c.Connect(i)
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		bctx, bcancel := context.WithTimeout(ctx, 30*time.Second)
		kv, err := natsnode.Bucket(bctx, js, dirfeed.Bucket)
		bcancel()
		if err != nil {
			t.Fatal(err)
		}
		store, err := kvtx.NewJetStream(ctx, nc, js, kv)
		if err != nil {
			t.Fatal(err)
		}
		d := directory.New()
		f := dirfeed.New(dirfeed.Config{NC: nc, KV: kv, Store: store, Dir: d, Node: fmt.Sprintf("n%d", i)})
		wg.Add(1)
		go func() { defer wg.Done(); f.Run(ctx) }()
		nodes[i] = node{d, f}
	}
	for i, n := range nodes {
		select {
		case <-n.feed.Synced():
		case <-time.After(30 * time.Second):
			t.Fatalf("node %d never synced", i)
		}
	}
	return nodes
}

func leaf(t *testing.T, serial int64, name string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://fleet.test/device/" + name)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}, &x509.Certificate{SerialNumber: big.NewInt(1)}, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func issue(n node, serial int64, name string) {
	n.dir.Issued(&fleet.Certificate{Serial: fleet.SerialString(big.NewInt(serial)), Role: identity.RoleDevice, Name: name, NotAfter: time.Now().Add(time.Hour)},
		&fleet.Device{ID: name, Group: "g", State: fleet.StateActive})
}

func waitFor(t *testing.T, what string, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A certificate issued on node 0 is accepted on node 2; its revocation on
// node 0 reaches node 2's watchers (latency measured), and node 2's view
// refuses it.
func TestRevocationReachesEveryNode(t *testing.T) {
	c := natstest.Start(t, 3)
	nodes := start(t, c)
	revoked := make(chan string, 100)
	nodes[2].dir.Watch(func(ev fleet.Event) {
		if ev.Kind == fleet.EventCertRevoked {
			revoked <- ev.Serial
		}
	})
	const n = 50
	for i := range n {
		issue(nodes[0], int64(100+i), fmt.Sprintf("d%d", i))
	}
	l := leaf(t, 100, "d0")
	waitFor(t, "issued certificates on node 2", 10*time.Second, func() bool {
		_, _, err := nodes[2].dir.Verify(l, "fleet.test", time.Now())
		_, ok := nodes[2].dir.CertStatus(fleet.SerialString(big.NewInt(100 + n - 1)))
		return err == nil && ok
	})
	var lat []time.Duration
	for i := range n {
		s := fleet.SerialString(big.NewInt(int64(100 + i)))
		t0 := time.Now()
		nodes[0].dir.Revoked(fmt.Sprintf("d%d", i), s)
		select {
		case got := <-revoked:
			if got != s {
				t.Fatalf("revocation of %s arrived as %s", s, got)
			}
			lat = append(lat, time.Since(t0))
		case <-time.After(10 * time.Second):
			t.Fatalf("revocation %d never reached node 2", i)
		}
	}
	slices.Sort(lat)
	t.Logf("revocation on node 0 → node 2's watchers, %d revocations: p50 %s, p99 %s, max %s", n, lat[n/2], lat[n*99/100], lat[n-1])
	if _, reason, _ := nodes[2].dir.Verify(l, "fleet.test", time.Now()); reason != fleet.ReasonRevoked {
		t.Fatalf("node 2 after the revocation: %q", reason)
	}
}

// Node 2 cut off: within the bound (plus a heartbeat) it refuses every
// certificate as stale and is not fresh; the others go on revoking; after
// the heal node 2 has every revocation, with no gap, and is fresh again.
func TestPartitionedNodeFailsClosedAndCatchesUp(t *testing.T) {
	c := natstest.Start(t, 3)
	nodes := start(t, c)
	const n = 30
	for i := range n {
		issue(nodes[0], int64(500+i), fmt.Sprintf("p%d", i))
	}
	l := leaf(t, 500, "p0")
	waitFor(t, "certificates on node 2", 10*time.Second, func() bool {
		_, ok := nodes[2].dir.CertStatus(fleet.SerialString(big.NewInt(500 + n - 1)))
		return ok
	})
	c.Cut(2)
	cut := time.Now()
	waitFor(t, "node 2 stale", 5*time.Second, func() bool { return !nodes[2].feed.Fresh() })
	t.Logf("node 2 stale %s after the cut (bound 1s)", time.Since(cut).Round(time.Millisecond))
	if _, reason, err := nodes[2].dir.Verify(l, "fleet.test", time.Now()); reason != fleet.ReasonDirectoryStale || !errors.Is(err, directory.ErrStale) {
		t.Fatalf("a stale node accepted a certificate: %q %v", reason, err)
	}
	// The majority revokes; it may first have to elect a new leader.
	waitFor(t, "majority fresh", 20*time.Second, func() bool { return nodes[0].feed.Fresh() })
	for i := range n {
		nodes[0].dir.Revoked(fmt.Sprintf("p%d", i), fleet.SerialString(big.NewInt(int64(500+i))))
	}
	// Committed: in the bucket (a majority stored them), not only seen
	// published.
	kv := bucket(t, c, 1)
	waitFor(t, "revocations in the bucket", 20*time.Second, func() bool {
		for i := range n {
			if !bucketRevoked(kv, fleet.SerialString(big.NewInt(int64(500+i)))) {
				return false
			}
		}
		return true
	})
	before := nodes[2].feed.Applied()
	c.Heal(2)
	healed := time.Now()
	waitFor(t, "node 2 fresh after the heal", 30*time.Second, func() bool { return nodes[2].feed.Fresh() })
	t.Logf("node 2 fresh %s after the heal (watch resumed after revision %d, now %d)", time.Since(healed).Round(time.Millisecond), before, nodes[2].feed.Applied())
	for i := range n {
		if st, _ := nodes[2].dir.CertStatus(fleet.SerialString(big.NewInt(int64(500 + i)))); !st.Revoked {
			t.Fatalf("node 2 fresh but revocation %d missing", i)
		}
	}
	if _, reason, _ := nodes[2].dir.Verify(l, "fleet.test", time.Now()); reason != fleet.ReasonRevoked {
		t.Fatalf("node 2 after the heal: %q", reason)
	}
}

// A revocation in the bucket is terminal: a node's later write of the
// same certificate unrevoked (a stale view) does not undo it.
func TestRevocationInTheBucketIsTerminal(t *testing.T) {
	c := natstest.Start(t, 3)
	nodes := start(t, c)
	issue(nodes[1], 900, "t0")
	s := fleet.SerialString(big.NewInt(900))
	waitFor(t, "certificate on node 0", 10*time.Second, func() bool { _, ok := nodes[0].dir.CertStatus(s); return ok })
	nodes[0].dir.Revoked("t0", s)
	// Node 1 re-records the certificate as issued (what a stale
	// registry would publish).
	issue(nodes[1], 900, "t0")
	fresh := directory.New()
	nc := c.Connect(2)
	js, _ := jetstream.New(nc)
	kv, err := natsnode.Bucket(context.Background(), js, dirfeed.Bucket)
	if err != nil {
		t.Fatal(err)
	}
	store, err := kvtx.NewJetStream(context.Background(), nc, js, kv)
	if err != nil {
		t.Fatal(err)
	}
	f := dirfeed.New(dirfeed.Config{NC: nc, KV: kv, Store: store, Dir: fresh, Node: "late"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.Run(ctx) }()
	defer func() { cancel(); <-done }()
	<-f.Synced()
	if st, ok := fresh.CertStatus(s); !ok || !st.Revoked {
		t.Fatalf("a node joining later sees %+v %v, want revoked", st, ok)
	}
}

func bucket(t *testing.T, c *natstest.Cluster, i int) jetstream.KeyValue {
	t.Helper()
	js, err := jetstream.New(c.Connect(i))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := natsnode.Bucket(ctx, js, dirfeed.Bucket)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// bucketRevoked: the bucket holds the certificate revoked.
func bucketRevoked(kv jetstream.KeyValue, serial string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	e, err := kv.Get(ctx, "c."+serial)
	if err != nil {
		return false
	}
	var c api.FeedCert
	return json.Unmarshal(e.Value(), &c) == nil && c.Revoked
}

// A revocation whose publication was never committed (its node cut off
// from the majority) is not taken as replicated because the node saw its
// own publication on the bucket's subject: it is committed once the node
// is back, and reaches the other nodes.
func TestUncommittedRevocationIsRepublished(t *testing.T) {
	c := natstest.Start(t, 3)
	nodes := start(t, c)
	issue(nodes[0], 700, "u0")
	s := fleet.SerialString(big.NewInt(700))
	kv := bucket(t, c, 1)
	waitFor(t, "certificate on node 1", 10*time.Second, func() bool { _, ok := nodes[1].dir.CertStatus(s); return ok })
	c.Cut(0)
	waitFor(t, "node 0 stale", 5*time.Second, func() bool { return !nodes[0].feed.Fresh() })
	// The publication times out (no majority); node 0's own subscription
	// sees it all the same. Give the retry a few rounds while cut.
	nodes[0].dir.Revoked("u0", s)
	time.Sleep(4 * time.Second)
	if bucketRevoked(kv, s) {
		t.Fatal("a revocation committed without a majority")
	}
	c.Heal(0)
	waitFor(t, "revocation in the bucket after the heal", 30*time.Second, func() bool { return bucketRevoked(kv, s) })
	waitFor(t, "revocation on node 1", 10*time.Second, func() bool { st, _ := nodes[1].dir.CertStatus(s); return st.Revoked })
}
