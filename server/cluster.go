package server

// A cluster node (docs/cluster.md): with --cluster-name (an embedded NATS
// JetStream node, routes to the others) or --nats-url (a NATS cluster the
// user runs), the node shares its directory and its registry (devices,
// certificates, EKs, tokens, operator roles, audit) with the other nodes
// through JetStream R3 buckets. Without either flag nothing
// here runs: the single box stays badger only, no NATS.
//
// New does not wait for the NATS cluster to form (the nodes start one by
// one): until the buckets are open and the directory proven fresh, the
// directory refuses every certificate (fail closed), /readyz answers 503,
// and registry operations wait for the shared store (bounded) and fail.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"

	"github.com/fleetgate/fleetgate/cluster/dirfeed"
	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/enroll/registry/kvtx"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// ClusterConfig are the settings of a cluster node (Config.Cluster).
type ClusterConfig struct {
	// ClusterName turns on the embedded NATS node: the same on every node.
	ClusterName string `yaml:"cluster_name"`
	// NodeName names this node (unique in the cluster; [a-z0-9-]).
	NodeName string `yaml:"node_name"`
	// NATSListen is where the embedded node accepts routes (host:port).
	NATSListen string `yaml:"nats_listen"`
	// NATSAdvertise is the route address told to the other nodes (default
	// NATSListen).
	NATSAdvertise string `yaml:"nats_advertise"`
	// NATSRoutes are the other nodes' NATSListen addresses.
	NATSRoutes []string `yaml:"nats_routes"`
	// NATSClientAddr is the embedded node's client listener for tools
	// (default none; fleetgate's own client is in process): TLS, and
	// only the users of nats_client_users.
	NATSClientAddr string `yaml:"nats_client_addr"`
	// NATSURL: connect to an existing NATS cluster instead (comma-separated
	// nats:// URLs); it must have at least three JetStream servers.
	NATSURL string `yaml:"nats_url"`
	// StaleAfter bounds how old a node's proven view of revocations may
	// be before it refuses every certificate and reports not ready.
	StaleAfter time.Duration `yaml:"cluster_stale_after"`
	// StaleCloseAfter is the second bound: past it the node also closes
	// its live sessions (broker/cluster, stale.go). Above StaleAfter; the
	// other nodes send the wills of a silent node's sessions 2 s after it
	// (at least 5 s). 0: the default (closeAfter).
	StaleCloseAfter time.Duration `yaml:"cluster_stale_close_after"`
	// ShutdownTimeout bounds the cluster writes of a graceful stop as a
	// whole (the session records and wills of the connections it closes;
	// brokercluster.go). 0: 5 s.
	ShutdownTimeout time.Duration `yaml:"cluster_shutdown_timeout"`
	// Security: TLS and authentication of NATS (natssec.go).
	Security NATSSecurity `yaml:",inline"`
}

// DefaultStaleCloseAfter is cluster_stale_close_after's default. It is
// above the time JetStream takes to replace a dead leader: a follower
// campaigns 4 to 9 s (nats-server's raft election timeout, not
// configurable) after it last heard from the leader, and only then are
// heartbeats acknowledged again. Every node's view is unproven meanwhile,
// so a bound inside that window made the death of the one node (or NATS
// server) leading the directory's bucket close every session of the
// cluster (5 s until 2026-12-07: seen in CI, and in the failover
// benchmark's lost subscriber). New CONNECTs are still refused from the
// first bound on.
const DefaultStaleCloseAfter = 15 * time.Second

// closeAfter is the second bound in force: StaleCloseAfter, or for 0 the
// default (at least twice StaleAfter).
func (c ClusterConfig) closeAfter() time.Duration {
	if c.StaleCloseAfter > 0 {
		return c.StaleCloseAfter
	}
	return max(DefaultStaleCloseAfter, 2*c.StaleAfter)
}

// Enabled: this process is a cluster node.
func (c ClusterConfig) Enabled() bool { return c.ClusterName != "" || c.NATSURL != "" }

// clusterKeys are the cluster settings, by flag name (layered by Load
// like every other setting).
var clusterKeys = []string{"cluster-name", "node-name", "nats-listen", "nats-advertise", "nats-routes", "nats-client-addr", "nats-url", "cluster-stale-after", "cluster-stale-close-after", "cluster-shutdown-timeout"}

func init() { keys = append(keys, clusterKeys...) }

// clusterFlags defines the cluster flags on fs.
func clusterFlags(fs *pflag.FlagSet, d Config) {
	c := d.Cluster
	fs.String("cluster-name", c.ClusterName, "run a cluster node with an embedded NATS JetStream server; the same name on every node (docs/cluster.md)")
	fs.String("node-name", c.NodeName, "this cluster node's name, unique in the cluster ([a-z0-9-])")
	fs.String("nats-listen", c.NATSListen, "with --cluster-name: where the embedded NATS node accepts routes from the other nodes (host:port)")
	fs.String("nats-advertise", c.NATSAdvertise, "with --cluster-name: the route address told to the other nodes (default --nats-listen)")
	fs.StringSlice("nats-routes", c.NATSRoutes, "with --cluster-name: the other nodes' --nats-listen addresses (comma-separated)")
	fs.String("nats-client-addr", c.NATSClientAddr, "with --cluster-name: the embedded NATS node's client listener for tools (default none; TLS, users of --nats-client-users)")
	fs.String("nats-url", c.NATSURL, "run a cluster node on an existing NATS cluster (comma-separated tls:// URLs, nats:// only with --nats-allow-plaintext; at least 3 JetStream servers, sync_interval always)")
	fs.Duration("cluster-stale-after", c.StaleAfter, "a cluster node whose proven view of revocations is older than this refuses every certificate and reports not ready")
	fs.Duration("cluster-stale-close-after", c.StaleCloseAfter, "a cluster node whose proven view of revocations is older than this closes its live sessions (MQTT 5: 0x8B); above --cluster-stale-after")
	fs.Duration("cluster-shutdown-timeout", c.ShutdownTimeout, "a cluster node's graceful stop gives up its last cluster writes (session records, wills) after this, as a whole; the other nodes then sweep its sessions (0: 5s)")
	natsSecFlags(fs, c.Security)
}

func assignCluster(c *Config, k string, fs *pflag.FlagSet) error {
	var err error
	switch k {
	case "cluster-name":
		c.Cluster.ClusterName, err = fs.GetString(k)
	case "node-name":
		c.Cluster.NodeName, err = fs.GetString(k)
	case "nats-listen":
		c.Cluster.NATSListen, err = fs.GetString(k)
	case "nats-advertise":
		c.Cluster.NATSAdvertise, err = fs.GetString(k)
	case "nats-routes":
		c.Cluster.NATSRoutes, err = fs.GetStringSlice(k)
	case "nats-client-addr":
		c.Cluster.NATSClientAddr, err = fs.GetString(k)
	case "nats-url":
		c.Cluster.NATSURL, err = fs.GetString(k)
	case "cluster-stale-after":
		c.Cluster.StaleAfter, err = fs.GetDuration(k)
	case "cluster-stale-close-after":
		c.Cluster.StaleCloseAfter, err = fs.GetDuration(k)
	case "cluster-shutdown-timeout":
		c.Cluster.ShutdownTimeout, err = fs.GetDuration(k)
	default:
		err = assignNATSSec(&c.Cluster.Security, k, fs)
	}
	return err
}

// validate returns every problem of the cluster settings.
func (c ClusterConfig) validate() []error {
	var errs []error
	if c.StaleAfter < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("cluster_stale_after: %s is below 100ms", c.StaleAfter))
	}
	if c.StaleCloseAfter != 0 && c.StaleCloseAfter <= c.StaleAfter {
		errs = append(errs, fmt.Errorf("cluster_stale_close_after: %s must be above cluster_stale_after (%s)", c.StaleCloseAfter, c.StaleAfter))
	}
	if c.ShutdownTimeout < 0 {
		errs = append(errs, fmt.Errorf("cluster_shutdown_timeout: %s is negative", c.ShutdownTimeout))
	}
	errs = append(errs, c.validateNATSSec()...)
	if !c.Enabled() {
		if c.NodeName != "" || c.NATSListen != "" || len(c.NATSRoutes) > 0 {
			errs = append(errs, errors.New("node_name, nats_listen and nats_routes need cluster_name (or nats_url)"))
		}
		return errs
	}
	if c.ClusterName != "" && c.NATSURL != "" {
		errs = append(errs, errors.New("cluster_name (embedded NATS) and nats_url (external NATS) exclude each other"))
	}
	if err := identity.ValidateName(c.NodeName); err != nil {
		errs = append(errs, fmt.Errorf("node_name: %w", err))
	}
	if c.ClusterName != "" {
		if _, _, err := splitHostPort(c.NATSListen); err != nil {
			errs = append(errs, fmt.Errorf("nats_listen: %q: %w", c.NATSListen, err))
		}
		if len(c.NATSRoutes) < 2 {
			errs = append(errs, fmt.Errorf("nats_routes: %d routes; a cluster needs at least 3 nodes (R3)", len(c.NATSRoutes)))
		}
	}
	return errs
}

func splitHostPort(a string) (string, string, error) {
	h, p, err := net.SplitHostPort(a)
	if err == nil && p == "" {
		err = errors.New("no port")
	}
	return h, p, err
}

// Buckets of a cluster.
const (
	registryBucket = "fleetgate_registry"
)

// clusterPart is this process's share of the cluster: the NATS node or
// client, the shared store and the directory's feed.
type clusterPart struct {
	cfg    ClusterConfig
	log    *slog.Logger
	node   *natsnode.Node // nil with --nats-url
	nc     *nats.Conn
	dir    *directory.Directory
	shared *lazyStore
	reg    *registry.Registry // nil with --only broker
	// seeded runs once the node's records are in the shared bucket (the
	// operator role migration, which needs the shared store).
	seeded func()

	mu   sync.Mutex
	feed *dirfeed.Feed // once the buckets are open
}

// buildClusterDirectory is buildDirectory of a cluster node: the
// directory gated until the cluster feeds it, and the registry (unless
// --only broker) with the cluster's shared store.
func (s *Server) buildClusterDirectory() (*directory.Directory, error) {
	dir := directory.New()
	if err := s.buildCluster(dir); err != nil {
		return nil, err
	}
	if s.cfg.Only == OnlyBroker {
		return dir, nil
	}
	// Every record of the registry is in the cluster's bucket; the
	// directory is fed by the cluster (dirfeed), and the node's own badger
	// records are copied into the bucket once it is open (SeedShared).
	reg, err := registry.Open(s.layout.RegistryDir(), registry.Options{Logger: s.log.With("component", "registry"),
		Directory: dir, Shared: s.clu.shared, DirectoryFed: true})
	if err != nil {
		return nil, err
	}
	s.reg = reg
	s.clu.reg = reg
	return dir, nil
}

// buildCluster starts the embedded NATS node (or connects to the external
// cluster) and gates dir until the feed proves it fresh.
func (s *Server) buildCluster(dir *directory.Directory) error {
	cc := s.cfg.Cluster
	log := s.log.With("component", "cluster", "node", cc.NodeName)
	p := &clusterPart{cfg: cc, log: log, dir: dir, shared: &lazyStore{ready: make(chan struct{})}}
	var err error
	if cc.ClusterName != "" {
		ncfg := natsnode.Config{Name: cc.NodeName, ClusterName: cc.ClusterName,
			ClientAddr: cc.NATSClientAddr, ClusterAddr: cc.NATSListen, Advertise: cc.NATSAdvertise, Routes: cc.NATSRoutes,
			StoreDir: filepath.Join(s.layout.Dir, "nats"), Logger: s.log}
		if err := embeddedNATSSecurity(s.layout, cc, &ncfg); err != nil {
			return err
		}
		p.node, err = natsnode.Start(ncfg)
		if err != nil {
			return err
		}
		p.nc, err = p.node.Connect("fleetgate-" + cc.NodeName)
		log.Info("embedded NATS node started", "cluster", cc.ClusterName, "routes_listen", p.node.ClusterAddr(),
			"routes", strings.Join(cc.NATSRoutes, ","), "client_url", p.node.ClientURL(), "sync", "always", "route_tls", !cc.Security.PlainRoutes)
	} else {
		p.nc, err = dialExternalNATS(cc, log)
	}
	if err != nil {
		p.close()
		return err
	}
	dir.SetGate(p.check)
	s.clu = p
	s.ready = append(s.ready, func() bool { return p.check() == nil })
	return nil
}

// check is the directory's gate until the feed runs, then the feed's.
func (p *clusterPart) check() error {
	p.mu.Lock()
	f := p.feed
	p.mu.Unlock()
	if f == nil {
		return fmt.Errorf("%w: cluster buckets not open yet", dirfeed.ErrStale)
	}
	return f.Check()
}

// staleFor is how old the node's proven view of revocations is; 0 until
// the feed first proved it (no session can exist before: the gate refuses
// every certificate).
func (p *clusterPart) staleFor() time.Duration {
	p.mu.Lock()
	f := p.feed
	p.mu.Unlock()
	if f == nil {
		return 0
	}
	select {
	case <-f.Synced():
		return f.Age()
	default:
		return 0
	}
}

// run opens the buckets (retrying until the cluster has formed) and runs
// the feed until ctx ends.
func (p *clusterPart) run(ctx context.Context) error {
	js, err := jetstream.New(p.nc)
	if err != nil {
		return err
	}
	var regKV, dirKV jetstream.KeyValue
	for {
		bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		regKV, err = natsnode.Bucket(bctx, js, registryBucket)
		if err == nil {
			dirKV, err = natsnode.Bucket(bctx, js, dirfeed.Bucket)
		}
		cancel()
		if err == nil || ctx.Err() != nil {
			break
		}
		p.log.Warn("waiting for the NATS cluster (the other nodes, a JetStream leader)", "err", err)
	}
	if ctx.Err() != nil {
		return nil
	}
	store, err := kvtx.NewJetStream(ctx, p.nc, js, regKV)
	if err != nil {
		return err
	}
	dirStore, err := kvtx.NewJetStream(ctx, p.nc, js, dirKV)
	if err != nil {
		return err
	}
	p.shared.set(store)
	if p.reg != nil {
		go p.seed(ctx)
	}
	fc := dirfeed.Config{NC: p.nc, KV: dirKV, Store: dirStore, Dir: p.dir, Node: p.cfg.NodeName, StaleAfter: p.cfg.StaleAfter, Logger: p.log}
	if p.reg != nil {
		// A device this node enrolled, revoked or suspended through
		// another node: its records here follow.
		fc.OnDevice = func(id string, st fleet.DeviceState) {
			if err := p.reg.ApplyClusterState(id, st); err != nil {
				p.log.Error("device state from the cluster not recorded", "device", id, "state", st, "err", err)
			}
		}
	}
	f := dirfeed.New(fc)
	var outbox sync.WaitGroup
	if p.reg != nil {
		// Commits publish their directory records through the feed; the
		// outbox of a node that stopped in between is drained here.
		p.reg.SetPublisher(f.PublishRecord)
		outbox.Add(1)
		go func() { defer outbox.Done(); p.reg.RunOutbox(ctx, outboxPeriod, outboxMinAge) }()
		defer outbox.Wait()
	}
	p.mu.Lock()
	p.feed = f
	p.mu.Unlock()
	p.dir.SetGate(p.check)
	go func() {
		select {
		case <-f.Synced():
			p.log.Info("cluster directory synced; accepting connections", "revision", f.Applied())
		case <-ctx.Done():
		}
	}()
	return f.Run(ctx)
}

// The registry's outbox (registry.RunOutbox): drained every outboxPeriod
// of the records it has seen unchanged for outboxMinAge, which their node did not publish.
const (
	outboxPeriod = 2 * time.Second
	outboxMinAge = 5 * time.Second
)

// seed copies the node's own registry records into the shared bucket
// (registry.SeedShared), retrying while the bucket does not answer.
func (p *clusterPart) seed(ctx context.Context) {
	for {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		_, err := p.reg.SeedShared(sctx)
		cancel()
		if err == nil && p.seeded != nil {
			p.seeded()
		}
		if err == nil || ctx.Err() != nil {
			return
		}
		p.log.Warn("the node's registry records not copied into the cluster yet; retrying", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
}

func (p *clusterPart) close() {
	if p.nc != nil {
		p.nc.Close()
	}
	if p.node != nil {
		p.node.Shutdown()
	}
}

// lazyStore is the shared store once the bucket is open; until then its
// calls wait (within their context) and fail.
type lazyStore struct {
	ready chan struct{}
	once  sync.Once
	s     kvtx.Store
}

func (l *lazyStore) set(s kvtx.Store) { l.once.Do(func() { l.s = s; close(l.ready) }) }

func (l *lazyStore) wait(ctx context.Context) (kvtx.Store, error) {
	select {
	case <-l.ready:
		return l.s, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("cluster store not open yet: %w", ctx.Err())
	}
}

func (l *lazyStore) Get(ctx context.Context, key string) (kvtx.Entry, error) {
	s, err := l.wait(ctx)
	if err != nil {
		return kvtx.Entry{}, err
	}
	return s.Get(ctx, key)
}

func (l *lazyStore) Commit(ctx context.Context, ops ...kvtx.Op) ([]uint64, error) {
	s, err := l.wait(ctx)
	if err != nil {
		return nil, err
	}
	return s.Commit(ctx, ops...)
}

func (l *lazyStore) List(ctx context.Context, prefix string) ([]kvtx.Entry, error) {
	s, err := l.wait(ctx)
	if err != nil {
		return nil, err
	}
	return s.List(ctx, prefix)
}

// Scan implements kvtx.Log (the registry's audit log).
func (l *lazyStore) Scan(ctx context.Context, prefix string, from, to uint64, fn func(kvtx.Entry) error) error {
	s, err := l.wait(ctx)
	if err != nil {
		return err
	}
	lg, ok := s.(kvtx.Log)
	if !ok {
		return errors.New("cluster store has no log")
	}
	return lg.Scan(ctx, prefix, from, to, fn)
}

// LastRev implements kvtx.Log.
func (l *lazyStore) LastRev(ctx context.Context) (uint64, error) {
	s, err := l.wait(ctx)
	if err != nil {
		return 0, err
	}
	lg, ok := s.(kvtx.Log)
	if !ok {
		return 0, errors.New("cluster store has no log")
	}
	return lg.LastRev(ctx)
}
