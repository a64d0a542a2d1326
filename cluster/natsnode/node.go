// Package natsnode is fleetgate's access to NATS JetStream, the one
// distributed engine of a cluster: an embedded nats-server cluster node
// (Start) with JetStream syncing every write before it acknowledges, or a
// client of a NATS cluster the user already runs (Dial). Either way the
// state lives in R3 buckets (Bucket), whose replica count is checked.
package natsnode

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Replicas is the replication of every stream and bucket: an
// acknowledgement means stored (and synced) on a majority of three.
const Replicas = 3

// Config of an embedded node.
type Config struct {
	// Name is the server's name, unique in the cluster (JetStream's peer
	// name).
	Name string
	// ClusterName is the same on every node of one cluster.
	ClusterName string
	// ClientAddr is where NATS clients connect (host:port): "" is none
	// (a loopback port no client can log in to, see clientListener);
	// fleetgate's own client is in process. A listener needs ClientUsers
	// (nobody connects without a password) and, unless PlainRoutes,
	// speaks TLS with TLS's certificate.
	ClientAddr string
	// ClientUsers may connect to the client listener, each with its
	// permissions (nil: everything).
	ClientUsers []*server.User
	// TLS is the node's TLS (ClusterCA.NodeTLS): routes are mutual TLS
	// verified against its roots only. Required unless PlainRoutes.
	TLS *tls.Config
	// PlainRoutes runs routes and the client listener without TLS: anyone
	// who reaches them joins the cluster. Only for tests that need it;
	// Start logs it as an error.
	PlainRoutes bool
	// ClusterAddr is where routes from the other nodes arrive (host:port).
	ClusterAddr string
	// Advertise, if set, is the route address this node tells the others
	// (default: ClusterAddr).
	Advertise string
	// Routes are the other nodes' route addresses (host:port or
	// nats-route://host:port).
	Routes []string
	// StoreDir holds JetStream's files.
	StoreDir string
	Logger   *slog.Logger
	// NoSync leaves JetStream's default (acknowledge before fsync, sync
	// every two minutes): only for measuring what syncing costs.
	NoSync bool
}

// Node is a running embedded nats-server.
type Node struct {
	srv *server.Server
	cfg Config
	// self is the in-process client's password when the server has
	// users (a client listener).
	self string
}

// selfUser names the node's own in-process client when the server has
// users.
const selfUser = "fleetgate-node"

// tlsTimeout is the seconds a route or client has for its TLS handshake
// (nats-server's default, 2 s, is short on a loaded machine).
const tlsTimeout = 5

func hostPort(addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %w", p, err)
	}
	if n == 0 {
		n = server.RANDOM_PORT
	}
	return h, n, nil
}

// Start starts an embedded node and waits until it accepts clients.
// JetStream runs with SyncAlways: every write is synced before it is
// acknowledged (nats-server's own default syncs every two minutes).
func Start(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Name == "" || cfg.ClusterName == "" || cfg.ClusterAddr == "" || cfg.StoreDir == "" {
		return nil, errors.New("natsnode: name, cluster name, cluster address and store directory are required")
	}
	if cfg.TLS == nil && !cfg.PlainRoutes {
		return nil, errors.New("natsnode: routes need TLS (the cluster CA's node TLS); plain routes only with PlainRoutes")
	}
	rh, rp, err := hostPort(cfg.ClusterAddr)
	if err != nil {
		return nil, fmt.Errorf("natsnode: cluster address: %w", err)
	}
	opts := &server.Options{
		ServerName: cfg.Name,
		JetStream:  true, StoreDir: cfg.StoreDir, SyncAlways: !cfg.NoSync,
		Cluster: server.ClusterOpts{Name: cfg.ClusterName, Host: rh, Port: rp, Advertise: cfg.Advertise,
			PoolSize: -1},
		NoSigs: true, DisableShortFirstPing: true,
	}
	if cfg.TLS != nil {
		opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = cfg.TLS.Clone(), tlsTimeout
	}
	self, err := clientListener(opts, cfg)
	if err != nil {
		return nil, err
	}
	for _, r := range cfg.Routes {
		u, err := routeURL(r)
		if err != nil {
			return nil, err
		}
		opts.Routes = append(opts.Routes, u)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("natsnode: %w", err)
	}
	srv.SetLoggerV2(newLogger(cfg.Logger.With("component", "nats", "node", cfg.Name)), false, false, false)
	if cfg.PlainRoutes {
		cfg.Logger.Error("NATS routes WITHOUT TLS: anyone who reaches the route port joins the cluster, reads every bucket "+
			"and can forge records (PlainRoutes is for tests)", "node", cfg.Name, "routes_listen", cfg.ClusterAddr)
	}
	srv.Start()
	if !srv.ReadyForConnections(30 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("natsnode: %s not ready for connections in 30s", cfg.Name)
	}
	return &Node{srv: srv, cfg: cfg, self: self}, nil
}

// clientListener sets up the client listener of opts: TLS (unless
// PlainRoutes), and a password for every client, the node's own
// in-process client included (its password, returned, is random and never
// leaves the process). nats-server starts its routes only once its client
// listener accepts (StartRouting waits for the accept loop; DontListen
// would block them), so without ClientAddr the node listens on a free
// loopback port whose only user is its own in-process client: nobody
// else connects.
func clientListener(opts *server.Options, cfg Config) (string, error) {
	addr := cfg.ClientAddr
	if addr == "" {
		addr = "127.0.0.1:0"
	} else if len(cfg.ClientUsers) == 0 {
		return "", errors.New("natsnode: a client listener needs users (nobody connects without a password)")
	}
	for _, u := range cfg.ClientUsers {
		if u.Username == selfUser {
			return "", fmt.Errorf("natsnode: client user %q is the node's own (choose another name)", selfUser)
		}
	}
	var err error
	if opts.Host, opts.Port, err = hostPort(addr); err != nil {
		return "", fmt.Errorf("natsnode: client address: %w", err)
	}
	if cfg.TLS != nil {
		t := cfg.TLS.Clone()
		t.ClientAuth, t.ClientCAs = tls.NoClientCert, nil
		opts.TLSConfig, opts.TLSTimeout = t, tlsTimeout
	}
	self := rand.Text()
	opts.Users = []*server.User{{Username: selfUser, Password: self}}
	if cfg.ClientAddr != "" {
		opts.Users = append(opts.Users, cfg.ClientUsers...)
	}
	return self, nil
}

func routeURL(r string) (*url.URL, error) {
	if _, _, err := net.SplitHostPort(r); err == nil {
		r = "nats-route://" + r
	}
	u, err := url.Parse(r)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("natsnode: route %q is not host:port", r)
	}
	return u, nil
}

// Server is the embedded nats-server.
func (n *Node) Server() *server.Server { return n.srv }

// ClientURL is where NATS clients reach this node ("" without a client
// listener): tls:// when the listener speaks TLS.
func (n *Node) ClientURL() string {
	if n.cfg.ClientAddr == "" {
		return ""
	}
	return n.srv.ClientURL()
}

// ClusterAddr is the bound route listener.
func (n *Node) ClusterAddr() string { return n.srv.ClusterAddr().String() }

// Connect opens fleetgate's client on this node, in process (no TCP).
func (n *Node) Connect(name string) (*nats.Conn, error) {
	o := append(clientOptions(name, nil), nats.InProcessServer(n.srv))
	if n.self != "" {
		o = append(o, nats.UserInfo(selfUser, n.self))
	}
	return nats.Connect("", o...)
}

// Shutdown stops the node and waits until it has.
func (n *Node) Shutdown() {
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}

// InboxPrefix is the reply subjects' prefix of fleetgate's own clients
// (every KV read, every pulled message comes back under it): no other
// user's inbox prefix (_INBOX_<user>, server/natssec.go) covers it, and
// nats.go's default (_INBOX) is left to nobody.
const InboxPrefix = "_FLEETGATE_INBOX"

// clientOptions: fleetgate's inbox prefix; reconnect forever, quickly;
// tell log of each change.
func clientOptions(name string, log *slog.Logger) []nats.Option {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return []nats.Option{nats.Name(name), nats.CustomInboxPrefix(InboxPrefix), nats.MaxReconnects(-1), nats.ReconnectWait(100 * time.Millisecond),
		nats.ReconnectJitter(50*time.Millisecond, 50*time.Millisecond), nats.PingInterval(2 * time.Second), nats.MaxPingsOutstanding(2),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("NATS disconnected", "err", err) }),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info("NATS reconnected", "server", c.ConnectedUrlRedacted()) })}
}

// Dial connects to a NATS cluster the user runs (urls: comma-separated
// nats:// or tls:// URLs, tried in the order given), with extra options
// appended (ExternalAuth.Options). The cluster's replication is checked
// when the buckets are opened (Bucket), its sync setting by CheckSync.
func Dial(urls, name string, log *slog.Logger, extra ...nats.Option) (*nats.Conn, error) {
	nc, err := nats.Connect(urls, append(append(clientOptions(name, log), nats.DontRandomize()), extra...)...)
	if err != nil {
		return nil, fmt.Errorf("natsnode: connect %s: %w", redact(urls), explainConnect(err))
	}
	return nc, nil
}

// redact hides the passwords of comma-separated URLs.
func redact(urls string) string {
	var out []string
	for _, s := range strings.Split(urls, ",") {
		if u, err := url.Parse(strings.TrimSpace(s)); err == nil {
			s = u.Redacted()
		}
		out = append(out, s)
	}
	return strings.Join(out, ",")
}

// Bucket creates (or opens) the KV bucket with Replicas replicas, history
// 1, atomic batches allowed, direct gets off (reads are answered by the
// stream's leader, so a compare-and-swap reads the committed revision),
// and checks the replica count: a cluster with
// fewer than three JetStream servers cannot hold it, and a bucket someone
// created with fewer replicas is refused. It retries until ctx ends while
// the JetStream cluster has no leader yet.
func Bucket(ctx context.Context, js jetstream.JetStream, name string) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	var err error
	for {
		// Open it if it exists: creating or updating with the KV
		// configuration would drop the atomic-batch setting another node
		// added.
		kv, err = js.KeyValue(ctx, name)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: name, History: 1, Replicas: Replicas,
				Storage: jetstream.FileStorage})
		}
		if err == nil || ctx.Err() != nil {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err != nil {
		return nil, fmt.Errorf("natsnode: bucket %s with %d replicas (a NATS cluster of at least %d JetStream servers is needed): %w", name, Replicas, Replicas, err)
	}
	st, err := js.Stream(ctx, "KV_"+name)
	if err != nil {
		return nil, fmt.Errorf("natsnode: bucket %s: %w", name, err)
	}
	cfg := st.CachedInfo().Config
	if cfg.Replicas != Replicas {
		return nil, fmt.Errorf("natsnode: bucket %s has %d replicas, want %d", name, cfg.Replicas, Replicas)
	}
	if cfg.AllowAtomicPublish && !cfg.AllowDirect {
		return kv, nil
	}
	// nats.go creates every bucket with AllowDirect, and its KeyValue then
	// reads with direct gets, which any replica answers, a lagging follower
	// too (nats-server subscribes every caught-up replica to the direct-get
	// queue group): a compare-and-swap that re-reads after a failed swap
	// can read the same stale revision again and again. Without it, Get is
	// STREAM.MSG.GET, answered by the stream's leader.
	cfg.AllowAtomicPublish = true
	cfg.AllowDirect = false
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		return nil, fmt.Errorf("natsnode: bucket %s: allow atomic batches, leader reads: %w", name, err)
	}
	// Bind again: nats.go decides on direct gets when it binds.
	if kv, err = js.KeyValue(ctx, name); err != nil {
		return nil, fmt.Errorf("natsnode: bucket %s: %w", name, err)
	}
	return kv, nil
}

// logger adapts nats-server's logger to slog. Warnings and errors (a
// refused route or client: TLS handshake, authorization) are logged at
// most once per logEvery for each message format, with the number left
// out since.
type logger struct {
	l       *slog.Logger
	mu      sync.Mutex
	last    map[string]time.Time
	dropped map[string]int
}

const logEvery = 10 * time.Second

func newLogger(l *slog.Logger) *logger {
	return &logger{l: l, last: map[string]time.Time{}, dropped: map[string]int{}}
}

// connPrefix is what nats-server puts before a connection's messages
// ("127.0.0.1:5555 - rid:7 - "): the rate limit's key leaves it out.
var connPrefix = regexp.MustCompile(`^\S+ - [a-z]+[^ :]*:\d+ - `)

func (g *logger) limited(f string, v ...any) {
	key := connPrefix.ReplaceAllString(f, "")
	now := time.Now()
	g.mu.Lock()
	if t, ok := g.last[key]; ok && now.Sub(t) < logEvery {
		g.dropped[key]++
		g.mu.Unlock()
		return
	}
	n := g.dropped[key]
	g.last[key] = now
	delete(g.dropped, key)
	g.mu.Unlock()
	if n > 0 {
		g.l.Warn(fmt.Sprintf(f, v...), "suppressed", n)
		return
	}
	g.l.Warn(fmt.Sprintf(f, v...))
}

func (g *logger) Noticef(f string, v ...any) { g.l.Debug(fmt.Sprintf(f, v...)) }
func (g *logger) Warnf(f string, v ...any)   { g.limited(f, v...) }
func (g *logger) Fatalf(f string, v ...any)  { g.l.Error(fmt.Sprintf(f, v...)) }
func (g *logger) Errorf(f string, v ...any)  { g.limited(f, v...) }
func (g *logger) Debugf(f string, v ...any)  {}
func (g *logger) Tracef(f string, v ...any)  {}
