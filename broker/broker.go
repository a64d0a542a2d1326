// Package broker is fleetgate's MQTT broker: mochi-mqtt v2 embedded behind an
// mTLS listener with a handshake+CONNECT deadline, with exactly one
// authentication/ACL hook (broker/auth), persistence in badger, and live
// enforcement of revocation: when the registry revokes or suspends, the
// broker closes the affected sessions at once.
package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	badgerdb "github.com/dgraph-io/badger/v4"
	mqtt "github.com/mochi-mqtt/server/v2"
	badgerhook "github.com/mochi-mqtt/server/v2/hooks/storage/badger"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/broker/auth"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Config configures the broker.
type Config struct {
	// Addr is the mTLS listen address (default ":8883").
	Addr string
	// TrustDomain is the SPIFFE trust domain of identities (the CA's).
	TrustDomain string
	// ClientCAs are the CAs client certificates must chain to: the issuing
	// CA only.
	ClientCAs  *x509.CertPool
	ServerCert tls.Certificate
	// ServerCertFunc, if set, gives the certificate of each handshake in
	// place of ServerCert (which stays required): the server certificate
	// with a current OCSP staple (server/ocsp.go).
	ServerCertFunc func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// Directory is the in-memory view of devices and certificates: the
	// registry's (in-process) or one fed by a replica (a broker running
	// apart: broker/replica).
	Directory *directory.Directory
	Policy    *acl.Policy
	Logger    *slog.Logger
	Metrics   prometheus.Registerer
	Now       func() time.Time
	// PersistDir holds mochi's badger store; empty: no persistence.
	PersistDir string
	// HandshakeTimeout bounds TLS handshake + CONNECT. It and the settings
	// below have their defaults in server.Defaults (required here, but for
	// TopicAliasMaximum, Limits, MaxQoS and Queues).
	HandshakeTimeout time.Duration
	// MaxPending caps connections that have not completed TLS + CONNECT.
	MaxPending int
	// MaxPacketSize in bytes.
	MaxPacketSize uint32
	// TopicAliasMaximum is the number of topic aliases an MQTT 5 client may
	// set on its publishes (default 16; negative: none). Announced in
	// CONNACK with MaxPacketSize.
	TopicAliasMaximum int
	// Limits per client (zero: DefaultLimits).
	Limits Limits
	// MaxPendingPerIP caps the stalled connections (no complete TLS
	// ClientHello yet) of one source address; beyond it a new connection
	// from the address evicts its oldest stalled one.
	// Connections past their ClientHello are not capped per address.
	MaxPendingPerIP int
	// HelloTimeout bounds the wait for a connection's first complete TLS
	// ClientHello (at most HandshakeTimeout).
	HelloTimeout time.Duration
	// MaxQoS is the highest QoS granted (default 2).
	MaxQoS byte
	// ReceiveMaximum is the in-flight window of QoS 1/2 messages per client
	// in each direction.
	ReceiveMaximum uint16
	// SweepInterval is how often sessions whose certificate expired while
	// connected are closed.
	SweepInterval time.Duration
	// Queues are the outbound queue policies by role (zero: DefaultQueues).
	Queues Queues
	// MinTLS is the lowest TLS version accepted (0: TLS 1.3); with TLS 1.2
	// only TLS12CipherSuites are offered (tlsversion.go).
	MinTLS uint16
	// WSSAddr is the listen address of MQTT over WebSocket over mTLS
	// (empty: none); the same admission, checks and policy (wss.go).
	WSSAddr string
	// Hooks run after the auth and admin hooks and before the fan-out (a
	// cluster node's router, broker/cluster: its OnPublish sees every
	// authorised publish first and can withhold the PUBACK).
	Hooks []mqtt.Hook
}

// checkSettings reports the settings that are not set: their defaults are
// server.Defaults, not the broker's.
func (c *Config) checkSettings() error {
	var errs []error
	for _, s := range []struct {
		name  string
		unset bool
	}{
		{"Addr", c.Addr == ""}, {"HandshakeTimeout", c.HandshakeTimeout <= 0}, {"HelloTimeout", c.HelloTimeout <= 0},
		{"MaxPending", c.MaxPending <= 0}, {"MaxPendingPerIP", c.MaxPendingPerIP <= 0}, {"MaxPacketSize", c.MaxPacketSize == 0},
		{"SweepInterval", c.SweepInterval <= 0}, {"ReceiveMaximum", c.ReceiveMaximum == 0},
	} {
		if s.unset {
			errs = append(errs, fmt.Errorf("broker: %s is required", s.name))
		}
	}
	return errors.Join(errs...)
}

// Queues are the outbound queue policies (mochi's per-client queue of
// packets waiting for the client's socket) of devices and of the other
// roles (services, operators). Their MaxOffline is the quota of QoS 1/2
// messages a persistent session holds while its client is offline (0: the
// default, negative: no quota but mochi's 65,535); see operations.md,
// "Offline sessions".
type Queues struct {
	Device, Service mqtt.QueuePolicy
}

// Broker is a running or runnable broker.
type Broker struct {
	cfg    Config
	log    *slog.Logger
	server *mqtt.Server
	hook   *auth.Hook
	// storage persists sessions (nil without PersistDir).
	storage *storageHook
	events  *eventsHook
	admin   *adminHook // admin.go
	ln      *listener
	wss     *listener // MQTT over WebSocket (nil: none)
	policy  atomic.Pointer[acl.Policy]
	m       metrics
	stop    chan struct{}
	// quotaLog rate-limits the log of offline-quota drops per session.
	quotaLog *logguard.Limiter
	wg       sync.WaitGroup
	once     sync.Once
}

type metrics struct {
	authFailures *prometheus.CounterVec
	aclDenied    *prometheus.CounterVec
	connected    *prometheus.GaugeVec
	closed       *prometheus.CounterVec
	takeovers    prometheus.Counter
	limited      *prometheus.CounterVec
	msgsIn       prometheus.Counter
	bytesIn      prometheus.Counter
	msgsOut      prometheus.Counter
	bytesOut     prometheus.Counter
	dropped      prometheus.Counter
	quotaDropped *prometheus.CounterVec
}

// New builds a broker; Run starts it.
func New(cfg Config) (*Broker, error) {
	var errs []error
	if cfg.TrustDomain == "" || cfg.ClientCAs == nil {
		errs = append(errs, errors.New("broker: the trust domain and the client CAs are required"))
	}
	if cfg.Directory == nil {
		errs = append(errs, errors.New("broker: Directory is required"))
	}
	if len(cfg.ServerCert.Certificate) == 0 {
		errs = append(errs, errors.New("broker: server certificate is required"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// The settings' defaults are server.Defaults (one place); here they
	// are only required.
	if err := cfg.checkSettings(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Policy == nil {
		cfg.Policy = acl.Default()
	}
	if cfg.HelloTimeout > cfg.HandshakeTimeout {
		cfg.HelloTimeout = cfg.HandshakeTimeout
	}
	if cfg.MaxQoS == 0 || cfg.MaxQoS > 2 {
		cfg.MaxQoS = 2
	}
	cfg.Limits = cfg.Limits.withDefaults()
	cfg.Queues = cfg.Queues.withDefaults()
	b := &Broker{cfg: cfg, log: cfg.Logger.With("component", "broker"), stop: make(chan struct{})}
	b.policy.Store(cfg.Policy)
	b.initMetrics()
	b.quotaLog = logguard.New(logguard.Options{Burst: 3, Window: time.Minute, MaxKeys: 1024, Global: logGlobal, Summaries: logGlobal,
		Summary: logguard.LogSummary(b.log, "offline session quota full; further messages not queued for it")})

	// Per-packet refusals are logged a few times per client identity and
	// minute, then summarised (limits.go).
	refusals := newRefusalLog(b.log)
	b.hook = auth.New(auth.Options{
		LogRefusal:  refusals.Allow,
		TrustDomain: cfg.TrustDomain,
		Directory:   cfg.Directory,
		Policy:      b.policy.Load,
		Logger:      b.log,
		Now:         cfg.Now,
		Metrics: auth.Metrics{
			AuthFailure: func(r fleet.Reason) { b.m.authFailures.WithLabelValues(string(r)).Inc() },
			ACLDenied:   func(d string) { b.m.aclDenied.WithLabelValues(d).Inc() },
			Connected:   func(r identity.Role, d int) { b.m.connected.WithLabelValues(string(r)).Add(float64(d)) },
			Takeover:    func() { b.m.takeovers.Inc() },
		},
	})

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = cfg.MaxPacketSize
	// Each alias holds a topic of the client's: a few per client.
	caps.TopicAliasMaximum = 16
	if cfg.TopicAliasMaximum != 0 {
		caps.TopicAliasMaximum = uint16(max(0, min(cfg.TopicAliasMaximum, 65535)))
	}
	caps.AnnounceLimits = true
	caps.MaximumSessionExpiryInterval = 7 * 24 * 3600
	// Messages expire only when their publisher says so (MQTT 5 Message
	// Expiry Interval). mochi's default (one day) gave every message an
	// expiry its publisher never set, deleted QoS 1/2 messages waiting for
	// an offline session after a day — acknowledged, and lost — and retained
	// state after a day; a session's messages now live as long as it does
	// (at most MaximumSessionExpiryInterval, or its offline quota).
	caps.MaximumMessageExpiryInterval = 0
	// The outbound queue of a connection before it is authenticated; then
	// queuePolicy sizes it by role.
	caps.MaximumClientWritesPending = int32(cfg.Queues.Device.Size)
	caps.MaximumQos = cfg.MaxQoS
	caps.ReceiveMaximum = cfg.ReceiveMaximum
	// The store of QoS 1/2 messages per client: mochi drops (after the
	// publisher's PUBACK) what exceeds it, so it is as large as packet IDs
	// allow. It costs memory only when a subscriber falls behind.
	caps.MaximumInflight = 65535
	b.server = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		Logger:       b.log,
		InlineClient: true,
		// Sized for fleets of mostly idle sensors (mochi's defaults suit
		// throughput): larger packets are read and written through.
		// The read buffer is allocated for each connection's lifetime; the
		// write buffer only while packets are queued (mochi batches queued
		// packets up to this size into one TLS write, then frees it).
		ClientNetWriteBufferSize: 16 << 10,
		ClientNetReadBufferSize:  1024,
		ClientQueue:              b.queuePolicy,
		OfflineQuotaDropped:      b.offlineQuotaDropped,
		ServeRetained:            b.serveRetained,
	})
	// The events hook goes first: at disconnect it needs the session the
	// auth hook forgets.
	b.events = newEventsHook(b)
	if err := b.addHook(b.events, nil); err != nil {
		return nil, fmt.Errorf("broker: add events hook: %w", err)
	}
	if err := b.addHook(b.hook, nil); err != nil {
		return nil, fmt.Errorf("broker: add auth hook: %w", err)
	}
	if err := b.addAdminHook(); err != nil {
		return nil, fmt.Errorf("broker: add admin hook: %w", err)
	}
	for _, h := range cfg.Hooks {
		if err := b.addHook(h, nil); err != nil {
			return nil, fmt.Errorf("broker: add hook %s: %w", h.ID(), err)
		}
	}
	fh := &fanoutFirstHook{b: b}
	fh.inline = b.server.NewClient(nil, "local", fanoutClientID, true)
	if err := b.addHook(fh, nil); err != nil {
		return nil, fmt.Errorf("broker: add fan-out hook: %w", err)
	}
	lh := &limitsHook{b: b, l: cfg.Limits, msgsIn: b.m.msgsIn, bytesIn: b.m.bytesIn, msgsOut: b.m.msgsOut, bytesOut: b.m.bytesOut,
		dropped: b.m.dropped, limited: b.m.limited, refusals: refusals}
	if err := b.addHook(lh, nil); err != nil {
		return nil, fmt.Errorf("broker: add limits hook: %w", err)
	}
	if err := b.addHook(&keepaliveHook{max: cfg.Limits.MaxKeepalive}, nil); err != nil {
		return nil, fmt.Errorf("broker: add keepalive hook: %w", err)
	}
	if cfg.PersistDir != "" {
		bo := badgerdb.DefaultOptions(filepath.Clean(cfg.PersistDir)).WithLogger(nil).
			WithMemTableSize(16 << 20).WithNumMemtables(2).WithBlockCacheSize(16 << 20).WithValueLogFileSize(64 << 20)
		b.storage = newStorageHook()
		if err := b.addHook(b.storage, &badgerhook.Options{Path: cfg.PersistDir, Options: &bo}); err != nil {
			return nil, fmt.Errorf("broker: persistence in %s: %w", cfg.PersistDir, err)
		}
	}

	tcfg := b.serverTLS()
	b.ln = &listener{id: "mtls", addr: cfg.Addr, tls: tcfg, timeout: cfg.HandshakeTimeout,
		identOf: func(c *x509.Certificate) identity.Identity {
			id, _ := identity.FromCertificate(c, cfg.TrustDomain)
			return id
		},
		helloTimeout: cfg.HelloTimeout, adm: newAdmission(cfg.MaxPending, cfg.MaxPendingPerIP, cfg.HelloTimeout/3), log: b.log,
		onRefuse: func(r fleet.Reason) {
			b.m.authFailures.WithLabelValues(string(r)).Inc()
			if r == fleet.ReasonPendingLimit || r == fleet.ReasonPendingPerIP || r == fleet.ReasonPendingEvicted || r == fleet.ReasonPendingPerIdentity {
				b.m.limited.WithLabelValues(string(r)).Inc()
			}
		}}
	if err := b.server.AddListener(b.ln); err != nil {
		return nil, fmt.Errorf("broker: listen %s: %w", cfg.Addr, err)
	}
	if cfg.WSSAddr != "" {
		if err := b.addWSS(); err != nil {
			return nil, fmt.Errorf("broker: listen %s (wss): %w", cfg.WSSAddr, err)
		}
	}
	cfg.Directory.Watch(b.onRegistryEvent)
	return b, nil
}

// Outbound queues (mochi's per-client queue of packets waiting for the
// client's socket), by role. A sensor receives a few commands: 32 slots
// (256 bytes) instead of mochi's 1,024 (8 KiB) for each of a fleet of mostly
// idle connections. A backend service receives the fleet's telemetry: a deep
// queue, and when it is full anyway the publishers wait (their read loops
// stop, which TCP turns into backpressure on the devices) instead of having
// messages dropped. A QoS 0 message waits at most WaitQos0 for room, then is
// dropped, and further QoS 0 deliveries to that service are dropped without
// waiting until it takes a packet again; a QoS 1/2 message waits up to
// WaitQos12, then the stalled client is disconnected and the message stays
// in its session (resent on reconnect), never dropped after its PUBACK.
//
// While a persistent session's client is offline, its session holds at
// most MaxOffline QoS 1/2 messages (devices 1,000, as Mosquitto's
// max_queued_messages and EMQX's max_mqueue_len; services 10,000). A
// message for a full offline session is not stored for it, counted in
// fleetgate_broker_session_quota_dropped_total{role} and logged (rate
// limited); the publisher's PUBACK is not held back, nor is any other
// subscriber's delivery.
var DefaultQueues = Queues{
	Device:  mqtt.QueuePolicy{Size: 32, WaitQos0: 0, WaitQos12: 10 * time.Second, MaxOffline: 1000},
	Service: mqtt.QueuePolicy{Size: 4096, WaitQos0: 2 * time.Second, WaitQos12: 30 * time.Second, MaxOffline: 10_000},
}

func (q Queues) withDefaults() Queues {
	fill := func(p, d mqtt.QueuePolicy) mqtt.QueuePolicy {
		if p.Size <= 0 { // the default queue, with the quota given if any
			p = mqtt.QueuePolicy{Size: d.Size, WaitQos0: d.WaitQos0, WaitQos12: d.WaitQos12, MaxOffline: p.MaxOffline}
		}
		switch {
		case p.MaxOffline == 0:
			p.MaxOffline = d.MaxOffline
		case p.MaxOffline < 0:
			p.MaxOffline = 0 // mochi: no quota
		}
		return p
	}
	q.Device = fill(q.Device, DefaultQueues.Device)
	q.Service = fill(q.Service, DefaultQueues.Service)
	return q
}

// queuePolicy is mochi's ClientQueue: it sizes a client's outbound queue by
// the role of its certificate (for a session restored from the store, by
// its name in the registry).
func (b *Broker) queuePolicy(cl *mqtt.Client) mqtt.QueuePolicy {
	if b.clientRole(cl) != identity.RoleDevice {
		return b.cfg.Queues.Service
	}
	return b.cfg.Queues.Device
}

// clientRole is the role of a client: of its certificate when connected,
// else of its name in the registry (client ID = identity name, one
// namespace for all roles).
func (b *Broker) clientRole(cl *mqtt.Client) identity.Role {
	if c, ok := cl.Net.Conn.(interface{ Role() identity.Role }); ok && c.Role() != "" {
		return c.Role()
	}
	if cl.Net.Conn == nil && b.cfg.Directory != nil {
		if r, ok := b.cfg.Directory.PrincipalRole(clientName(cl.ID)); ok {
			return r
		}
	}
	return identity.RoleDevice
}

// offlineQuotaDropped is mochi's OfflineQuotaDropped: a QoS 1/2 message
// was not stored for an offline session that holds its quota already.
func (b *Broker) offlineQuotaDropped(cl *mqtt.Client, pk packets.Packet) {
	role := string(b.clientRole(cl))
	b.m.quotaDropped.WithLabelValues(role).Inc()
	if b.quotaLog.Allow(cl.ID) {
		b.log.Warn("offline session quota full; message not queued for it", "client", logguard.Clip(cl.ID, 0),
			"role", role, "topic", logguard.Clip(pk.TopicName, 0), "quota", b.queuePolicy(cl).MaxOffline)
	}
}

// ErrSecondAuthHook: a hook other than the auth hook provides
// authentication or ACL decisions.
var ErrSecondAuthHook = errors.New("broker: only the fleetgate auth hook may provide authentication or ACL checks")

// addHook is the only way hooks are added. It enforces the trust model
// (docs/architecture.md: exactly one hook provides authentication and ACL
// decisions): mochi ORs the answers of hooks, so a second hook providing
// authentication or ACL (mochi's auth.AllowHook, say) would open the
// broker.
func (b *Broker) addHook(h mqtt.Hook, config any) error {
	if h != mqtt.Hook(b.hook) && (h.Provides(mqtt.OnConnectAuthenticate) || h.Provides(mqtt.OnACLCheck)) {
		return fmt.Errorf("%w: %s", ErrSecondAuthHook, h.ID())
	}
	return b.server.AddHook(h, config)
}

func (b *Broker) initMetrics() {
	b.m = metrics{
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_broker_auth_failures_total",
			Help: "Refused TLS handshakes and CONNECTs by reason."}, []string{"reason"}),
		aclDenied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_broker_acl_denied_total",
			Help: "Denied publish/subscribe/retain by direction."}, []string{"direction"}),
		connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "fleetgate_broker_connections",
			Help: "Authenticated MQTT connections by role."}, []string{"role"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_broker_sessions_closed_total",
			Help: "Live sessions closed by the broker, by reason."}, []string{"reason"}),
		takeovers: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_session_takeovers_total",
			Help: "Connections that replaced a live session of the same identity."}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_broker_limit_hits_total",
			Help: "Clients over a limit, by limit (message_rate, byte_rate, subscriptions, pending, pending_per_ip, backpressure, events)."}, []string{"limit"}),
		msgsIn:   prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_messages_received_total", Help: "PUBLISH packets received."}),
		bytesIn:  prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_payload_bytes_received_total", Help: "PUBLISH payload bytes received."}),
		msgsOut:  prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_messages_sent_total", Help: "PUBLISH packets sent."}),
		bytesOut: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_payload_bytes_sent_total", Help: "PUBLISH payload bytes sent."}),
		quotaDropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_broker_session_quota_dropped_total",
			Help: "QoS 1/2 messages not queued for an offline persistent session because it held its quota (Queues MaxOffline), by the session's role; delivered to every other subscriber."}, []string{"role"}),
		dropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "fleetgate_broker_messages_dropped_total",
			Help: "QoS 0 messages dropped because a subscriber's outbound queue stayed full (a QoS 1/2 message is kept in the subscriber's session instead, and the stalled subscriber disconnected)."}),
	}
	if b.cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{b.m.authFailures, b.m.aclDenied, b.m.connected, b.m.closed,
			b.m.takeovers, b.m.limited, b.m.msgsIn, b.m.bytesIn, b.m.msgsOut, b.m.bytesOut, b.m.dropped, b.m.quotaDropped} {
			_ = b.cfg.Metrics.Register(c)
		}
	}
}

// Addr returns the listening address (after Run started listening).
func (b *Broker) Addr() string { return b.ln.Address() }

// SetPolicy swaps the policy in force; sessions are kept.
func (b *Broker) SetPolicy(p *acl.Policy) { b.policy.Store(p) }

// Policy returns the policy in force.
func (b *Broker) Policy() *acl.Policy { return b.policy.Load() }

// Connected reports whether client ID (identity name) has a live session.
func (b *Broker) Connected(name string) bool {
	s, ok := b.hook.Lookup(name)
	return ok && s.Online()
}

// Start listens and serves in the background. Use Run for a blocking call.
func (b *Broker) Start() error {
	if err := b.server.Serve(); err != nil {
		return fmt.Errorf("broker: serve: %w", err)
	}
	b.log.Info("broker listening", "addr", b.Addr())
	if b.wss != nil {
		b.log.Info("broker listening for MQTT over WebSocket (wss)", "addr", b.WSSAddr())
	}
	// Retained messages of devices revoked while the broker was down (the
	// store was read by Serve). A broker apart from the registry knows no
	// device yet; it withholds them at delivery instead (serveRetained).
	if n := b.server.ClearRetained(func(pk packets.Packet) bool { return b.retainedOfRevoked(pk, "") }); n > 0 {
		b.log.Info("deleted retained messages of revoked devices", "count", n)
	}
	b.wg.Add(3)
	go b.sweepLoop()
	go func() {
		defer b.wg.Done()
		ctx, cancel := context.WithCancel(context.Background())
		go func() { <-b.stop; cancel() }()
		b.quotaLog.Run(ctx)
	}()
	go func() {
		defer b.wg.Done()
		b.events.run(b.stop)
	}()
	return nil
}

// sweepLoop closes sessions whose certificate expired while connected.
func (b *Broker) sweepLoop() {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			return
		case <-t.C:
			b.SweepExpired()
		}
	}
}

// SweepExpired closes every session whose certificate has expired; it
// returns how many it closed.
func (b *Broker) SweepExpired() int {
	now := b.cfg.Now()
	n := 0
	b.hook.Sessions(func(s *auth.Session) bool {
		if s.Online() && !now.Before(s.NotAfter) {
			b.closeSession(s, "expired")
			n++
		}
		return true
	})
	return n
}

// Run serves until ctx is done, then closes every session and the store.
func (b *Broker) Run(ctx context.Context) error {
	if err := b.Start(); err != nil {
		return err
	}
	<-ctx.Done()
	return b.Close()
}

// Close stops the broker and waits for its client goroutines.
func (b *Broker) Close() error {
	b.once.Do(func() { close(b.stop) })
	err := b.server.Close()
	b.ln.wg.Wait()
	if b.wss != nil {
		b.wss.wg.Wait()
	}
	b.wg.Wait()
	return err
}

// onRegistryEvent closes the live sessions a revocation or suspension
// concerns. It runs on the registry's committing goroutine, before the
// revoke call returns to its caller.
func (b *Broker) onRegistryEvent(ev fleet.Event) {
	var match func(*auth.Session) bool
	reason := ""
	switch {
	case ev.Kind == fleet.EventCertRevoked:
		match = func(s *auth.Session) bool { return s.Serial == ev.Serial }
		reason = "revoked"
	case ev.Kind == fleet.EventDeviceChanged && (ev.State == fleet.StateRevoked || ev.State == fleet.StateSuspended):
		match = func(s *auth.Session) bool {
			return s.Identity.Role == identity.RoleDevice && s.Identity.Name == ev.DeviceID
		}
		reason = string(ev.State)
	default:
		return
	}
	b.hook.Sessions(func(s *auth.Session) bool {
		if match(s) && s.Online() {
			b.closeSession(s, reason)
		}
		return true
	})
	// A revoked device's retained messages are deleted (a suspended
	// device's are withheld while it is suspended: serveRetained).
	if ev.Kind == fleet.EventDeviceChanged && ev.State == fleet.StateRevoked {
		if n := b.server.ClearRetained(func(pk packets.Packet) bool { return b.retainedOfRevoked(pk, ev.DeviceID) }); n > 0 {
			b.log.Info("deleted retained messages of revoked device", "device", ev.DeviceID, "count", n)
		}
	}
}

// fanoutClientID is the inline client through which QoS 1/2 messages are
// fanned out before their PUBACK (durable.go). Retained messages stored
// before the fork kept the publisher's origin name it instead.
const fanoutClientID = "fleetgate-fanout"

// retainedDevice is the device a retained message is of: its publisher
// (origin); for a record from before origins were kept through the fan-out
// client, the device its topic names (devices/<id>/...). "" if none.
func retainedDevice(pk packets.Packet) string {
	if pk.Origin != "" && pk.Origin != fanoutClientID {
		return pk.Origin
	}
	if rest, ok := strings.CutPrefix(pk.TopicName, "devices/"); ok {
		id, _, _ := strings.Cut(rest, "/")
		return id
	}
	return ""
}

// retainedOfRevoked: pk is a retained message of a revoked device (of
// device id, if id is not empty).
func (b *Broker) retainedOfRevoked(pk packets.Packet, id string) bool {
	dev := retainedDevice(pk)
	if dev == "" || (id != "" && dev != id) {
		return false
	}
	return b.deviceRevoked(dev)
}

// deviceRevoked reports whether id names a device revoked in the
// directory.
func (b *Broker) deviceRevoked(id string) bool {
	st, ok := b.cfg.Directory.DeviceStatus(id)
	return ok && st.State == fleet.StateRevoked
}

// serveRetained is mochi's ServeRetained: a retained message of a device
// that is not active (revoked, suspended) is not served. Messages retained
// by services and operators are served.
func (b *Broker) serveRetained(_ *mqtt.Client, pk packets.Packet) bool {
	dev := retainedDevice(pk)
	if dev == "" {
		return true
	}
	st, ok := b.cfg.Directory.DeviceStatus(dev)
	if !ok {
		return true // not a device
	}
	return st.State == fleet.StateActive
}

func (b *Broker) closeSession(s *auth.Session, reason string) {
	if !s.MarkClosing() {
		return
	}
	b.log.Info("closing session", "identity", s.Identity.String(), "reason", reason, "remote", s.Client.Net.Remote)
	b.m.closed.WithLabelValues(reason).Inc()
	// A revoked, suspended or expired client's Last Will is not sent.
	atomic.StoreUint32(&s.Client.Properties.Will.Flag, 0)
	// [MQTT-3.14.2-1] reason 0x98 administrative action for MQTT 5 clients;
	// mochi sends DISCONNECT only to v5 clients and then closes.
	_ = b.server.DisconnectClient(s.Client, packets.ErrAdministrativeAction)
	s.Client.Stop(packets.ErrAdministrativeAction)
	b.hook.MarkOffline(s)
}
