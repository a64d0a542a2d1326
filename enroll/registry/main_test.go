package registry

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
)

// The registry's tests run twice (TestMain): on badger, the single box,
// and on a bucket of a 3-node JetStream cluster started here (nats-server
// from the Go module, on 127.0.0.1-3), each registry through one of the
// three nodes. FLEETGATE_REGISTRY_BACKEND=badger or =jetstream runs one.

// suite is the backend of the current pass.
var suite struct {
	name  string         // "badger" or "jetstream"
	conns []*nats.Conn   // jetstream: a client on each node
	mu    sync.Mutex     // guards byDir, n
	byDir map[string]int // registry directory → bucket number
	n     int
}

func TestMain(m *testing.M) {
	want := os.Getenv("FLEETGATE_REGISTRY_BACKEND")
	code := 0
	if want == "" || want == "badger" {
		suite.name = "badger"
		fmt.Println("=== registry tests on badger")
		code = m.Run()
	}
	if code == 0 && (want == "" || want == "jetstream") {
		stop, err := startSuiteCluster()
		if err != nil {
			fmt.Fprintln(os.Stderr, "registry tests: NATS cluster:", err)
			os.Exit(1)
		}
		suite.name = "jetstream"
		fmt.Println("=== registry tests on a 3-node JetStream cluster")
		code = m.Run()
		stop()
	}
	os.Exit(code)
}

func freeAddr(host string) (string, error) {
	ln, err := net.Listen("tcp", host+":0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func startSuiteCluster() (func(), error) {
	dir, err := os.MkdirTemp("", "registry-nats-")
	if err != nil {
		return nil, err
	}
	addrs := make([]string, 3)
	for i := range addrs {
		if addrs[i], err = freeAddr(fmt.Sprintf("127.0.0.%d", i+1)); err != nil {
			return nil, err
		}
	}
	var nodes []*natsnode.Node
	stop := func() {
		for _, c := range suite.conns {
			c.Close()
		}
		for _, n := range nodes {
			n.Shutdown()
		}
		os.RemoveAll(dir)
	}
	ca, err := natsnode.CreateCA(dir + "/ca")
	if err != nil {
		stop()
		return nil, err
	}
	for i := range 3 {
		var routes []string
		for j, a := range addrs {
			if j != i {
				routes = append(routes, a)
			}
		}
		nodeTLS, err := ca.NodeTLS(fmt.Sprintf("r%d", i))
		if err != nil {
			stop()
			return nil, err
		}
		n, err := natsnode.Start(natsnode.Config{Name: fmt.Sprintf("r%d", i), ClusterName: "registrytest",
			ClusterAddr: addrs[i], Routes: routes, TLS: nodeTLS,
			StoreDir: fmt.Sprintf("%s/n%d", dir, i), Logger: suiteLogger()})
		if err != nil {
			stop()
			return nil, err
		}
		nodes = append(nodes, n)
	}
	// Until JetStream has a meta leader, its API requests go unanswered.
	deadline := time.Now().Add(60 * time.Second)
	for _, n := range nodes {
		for !n.Server().JetStreamIsCurrent() {
			if time.Now().After(deadline) {
				stop()
				return nil, fmt.Errorf("no JetStream meta leader after 60s")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for i, n := range nodes {
		nc, err := n.Connect(fmt.Sprintf("registry-test-%d", i))
		if err != nil {
			stop()
			return nil, err
		}
		suite.conns = append(suite.conns, nc)
	}
	suite.byDir = map[string]int{}
	return stop, nil
}

// sharedStore returns the store of bucket n through node i.
func sharedStore(t testing.TB, n, i int) kvtx.Store {
	t.Helper()
	nc := suite.conns[i%len(suite.conns)]
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kv, err := natsnode.Bucket(ctx, js, fmt.Sprintf("regtest%d", n))
	if err != nil {
		t.Fatal(err)
	}
	s, err := kvtx.NewJetStream(ctx, nc, js, kv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newBucket returns the number of a new bucket.
func newBucket() int {
	suite.mu.Lock()
	defer suite.mu.Unlock()
	suite.n++
	return suite.n
}

// open is Open on the pass's backend: on jetstream, the registry in dir
// has a bucket of its own (the same one when dir is opened again), through
// one of the nodes.
func open(t testing.TB, dir string, o Options) (*Registry, error) {
	t.Helper()
	if suite.name == "jetstream" && o.Shared == nil {
		suite.mu.Lock()
		n, ok := suite.byDir[dir]
		if !ok {
			suite.n++
			n = suite.n
			suite.byDir[dir] = n
		}
		suite.mu.Unlock()
		o.Shared = sharedStore(t, n, n)
	}
	return Open(dir, o)
}

// onlyBadger skips a test of badger's own key layout on the other pass.
func onlyBadger(t *testing.T) {
	if suite.name != "badger" {
		t.Skip("badger's key layout")
	}
}

func suiteLogger() *slog.Logger {
	if os.Getenv("FLEETGATE_REGISTRY_NATS_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
