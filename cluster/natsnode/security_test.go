package natsnode_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

// syncBuf is a log sink tests read while nodes write.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// rogue starts a JetStream nats-server that dials node target's route
// listener directly, with routeTLS (nil: plain).
func rogue(t *testing.T, target string, routeTLS *tls.Config) *server.Server {
	t.Helper()
	u, err := natsnodeRoute(target)
	if err != nil {
		t.Fatal(err)
	}
	opts := &server.Options{ServerName: "rogue", Host: "127.0.0.9", Port: server.RANDOM_PORT, JetStream: true,
		StoreDir: t.TempDir(), NoSigs: true,
		Cluster: server.ClusterOpts{Name: "fgtest", Host: "127.0.0.9", Port: server.RANDOM_PORT, TLSConfig: routeTLS, TLSTimeout: 5},
		Routes:  []*url.URL{u}}
	return startServer(t, opts)
}

// startServer starts a nats-server of opts, stopped when the test ends.
func startServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	if !srv.ReadyForConnections(30 * time.Second) {
		t.Fatalf("nats-server %s not ready", opts.ServerName)
	}
	return srv
}

// A nats-server that dials a node's route port without a certificate of
// the cluster CA (none at all, or one of another CA, even trusting the
// cluster's) is refused, the refusal is in the node's log with its
// reason, and the rogue's clients cannot read the bucket.
func TestRogueRouteRefused(t *testing.T) {
	logs := &syncBuf{}
	c := natstest.StartWith(t, 3, func(i int, cfg *natsnode.Config) {
		if i == 0 {
			cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
		}
	})
	kv := bucket(t, c, 0)
	if _, err := kv.Put(context.Background(), "secret", []byte("registry record")); err != nil {
		t.Fatal(err)
	}
	other, err := natsnode.CreateCA(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	otherTLS, err := other.NodeTLS("n0")
	if err != nil {
		t.Fatal(err)
	}
	// The rogue knows the cluster CA's certificate (it is public), so the
	// node's own check is what refuses it.
	otherTLS.RootCAs = c.CA.Pool()
	for _, tc := range []struct {
		name   string
		tls    *tls.Config
		reason string
	}{
		{"no TLS", nil, "TLS route handshake error"},
		{"another CA", otherTLS, "certificate signed by unknown authority"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(logs.String(), tc.reason)
			r := rogue(t, c.Nodes[0].ClusterAddr(), tc.tls)
			waitFor(t, "the node to log the refusal ("+tc.reason+")", func() bool { return strings.Count(logs.String(), tc.reason) > before })
			if n := r.NumRoutes(); n != 0 {
				t.Fatalf("the rogue has %d routes", n)
			}
			nc, err := nats.Connect(r.ClientURL())
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			js, _ := jetstream.New(nc)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			if rkv, err := js.KeyValue(ctx, "t"); err == nil {
				if e, err := rkv.Get(ctx, "secret"); err == nil {
					t.Fatalf("the rogue read %q", e.Value())
				}
			}
			for i, n := range c.Nodes {
				if got := n.Server().NumRoutes(); got != 2 {
					t.Errorf("node %d has %d routes, want the 2 others", i, got)
				}
			}
		})
	}
}

func natsnodeRoute(addr string) (*url.URL, error) {
	return url.Parse("nats-route://" + addr)
}

// The client listener admits only its users, over TLS verified against
// the cluster CA.
func TestClientListenerNeedsPassword(t *testing.T) {
	c := natstest.Start(t, 3)
	plain := c.Nodes[1].ClientURL()
	if !strings.HasPrefix(plain, "tls://") {
		t.Fatalf("client URL %s is not TLS", plain)
	}
	ca := nats.RootCAs(c.CAFile)
	for name, u := range map[string]string{"no credentials": plain,
		"a wrong password": strings.Replace(plain, "tls://", "tls://"+natstest.ClientUser+":wrong@", 1)} {
		nc, err := nats.Connect(u, ca, nats.MaxReconnects(0))
		if err == nil {
			nc.Close()
			t.Errorf("%s: connected", name)
		} else if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(err.Error(), "Authorization Violation") {
			t.Errorf("%s: %v, want an authorization violation", name, err)
		}
	}
	// Without the cluster CA, the server's certificate is not trusted.
	if nc, err := nats.Connect(c.ClientURL(1), nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Error("connected without trusting the cluster CA")
	}
	nc, err := natsnode.Dial(c.ClientURL(1), "t", nil, ca)
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	// Dial explains an authorization failure.
	_, err = natsnode.Dial(plain, "t", nil, ca)
	if err == nil || !strings.Contains(err.Error(), "credentials") {
		t.Fatalf("Dial without credentials: %v", err)
	}
}

// A node with no client address admits no client but its own in-process
// one; one with a listener but no users, or routes without TLS, is
// refused at start, as is a user with the in-process client's name.
func TestNoClientUnlessAsked(t *testing.T) {
	c := natstest.StartWith(t, 3, func(i int, cfg *natsnode.Config) {
		if i == 2 {
			cfg.ClientAddr = ""
		}
	})
	if u := c.Nodes[2].ClientURL(); u != "" {
		t.Fatalf("client URL %q without a client address", u)
	}
	if _, err := c.Nodes[2].Connect("self"); err != nil {
		t.Fatalf("in-process client: %v", err)
	}
	// nats-server needs a listener for its routes: it admits nobody.
	l := c.Nodes[2].Server().Addr()
	if l == nil {
		t.Fatal("no loopback listener")
	}
	nc, err := nats.Connect("tls://"+l.String(), nats.Secure(&tls.Config{ServerName: natsnode.RouteServerName, RootCAs: c.CA.Pool(),
		MinVersion: tls.VersionTLS13}), nats.MaxReconnects(0))
	if err == nil {
		nc.Close()
		t.Fatal("a client connected to a node without a client address")
	}
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("%v, want an authorization violation", err)
	}
	tlsCfg, _ := c.CA.NodeTLS("x")
	dir := t.TempDir()
	for name, cfg := range map[string]natsnode.Config{
		"a listener without users": {ClientAddr: "127.0.0.1:0", TLS: tlsCfg},
		"routes without TLS":       {},
		"a user named as the node's own": {ClientAddr: "127.0.0.1:0", TLS: tlsCfg,
			ClientUsers: []*server.User{{Username: "fleetgate-node", Password: "0123456789abcdef"}}},
	} {
		cfg.Name, cfg.ClusterName, cfg.ClusterAddr, cfg.StoreDir = "x", "fgtest", "127.0.0.1:0", filepath.Join(dir, name)
		if n, err := natsnode.Start(cfg); err == nil {
			n.Shutdown()
			t.Errorf("%s: started", name)
		}
	}
}

// CheckSync tells a NATS server that acknowledges before it syncs from one
// that syncs first, from its monitoring endpoint.
func TestCheckSync(t *testing.T) {
	urls := map[bool]string{}
	for _, noSync := range []bool{false, true} {
		srv := startServer(t, &server.Options{ServerName: fmt.Sprint("s", noSync), Host: "127.0.0.1", Port: server.RANDOM_PORT,
			HTTPHost: "127.0.0.1", HTTPPort: server.RANDOM_PORT, JetStream: true, StoreDir: t.TempDir(), SyncAlways: !noSync, NoSigs: true})
		urls[noSync] = "http://" + srv.MonitorAddr().String()
	}
	ctx := context.Background()
	got, err := natsnode.CheckSync(ctx, http.DefaultClient, []string{urls[false]})
	if err != nil || len(got) != 1 || !got[0].SyncAlways {
		t.Fatalf("a server with sync always: %+v, %v", got, err)
	}
	_, err = natsnode.CheckSync(ctx, http.DefaultClient, []string{urls[false], urls[true]})
	if !errors.Is(err, natsnode.ErrUnsynced) {
		t.Fatalf("a server without sync always: %v", err)
	}
	if !strings.Contains(err.Error(), "strue (") || strings.Contains(err.Error(), "sfalse (") {
		t.Fatalf("the error names the wrong servers: %v", err)
	}
}

// A node starts only with the cluster CA: none (the error names the
// command that adds it) or a key others may read is refused; CreateCA
// never overwrites one.
func TestClusterCAFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cluster")
	if _, err := natsnode.LoadCA(dir); err == nil || !strings.Contains(err.Error(), "fleetgate init") {
		t.Fatalf("no CA: %v", err)
	}
	ca, err := natsnode.CreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, natsnode.CAKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	if _, err := natsnode.CreateCA(dir); err == nil {
		t.Fatal("CreateCA overwrote a CA")
	}
	again, err := natsnode.LoadCA(dir)
	if err != nil || !again.Cert.Equal(ca.Cert) {
		t.Fatalf("reload: %v", err)
	}
	if err := os.Chmod(filepath.Join(dir, natsnode.CAKeyFile), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := natsnode.LoadCA(dir); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("key readable by the group: %v", err)
	}
}
