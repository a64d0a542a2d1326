package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/broker/replica"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/operator"
)

// One builder per part. Each derives its part's configuration from Config,
// whose defaults are Defaults: the parts' own zero-value defaults are not
// relied on.

// pki is the CA and the server's TLS certificate.
type pki struct {
	ca         *ca.Authority
	serverCert tls.Certificate
	key        keystore.Key // the issuing CA's, from ca_key (cakey.go)
}

func loadPKI(l Layout, cfg Config, ocspAddr string) (pki, error) {
	if !ca.Initialized(l.Dir) {
		return pki{}, fmt.Errorf("%w: %s", ca.ErrNotInitialized, l.Dir)
	}
	serverCert, err := tls.LoadX509KeyPair(l.ServerCert(), l.ServerKey())
	if err != nil {
		return pki{}, fmt.Errorf("server TLS certificate: %w", err)
	}
	key, err := openCAKey(cfg, l)
	if err != nil {
		return pki{}, err
	}
	// A broker apart signs nothing: it loads the issuing CAs'
	// certificates only (their keys may be in another host's HSM or TPM).
	opts := ca.Options{Key: key, OCSPServer: ocspURLs(cfg, ocspAddr, serverCert.Leaf), NoKeys: cfg.Only == OnlyBroker}
	rot := rotationKeys(cfg, &opts) // cakey.go
	authority, err := ca.Load(l.Dir, opts)
	if err != nil {
		key.Close()
		rot.Close()
		return pki{}, fmt.Errorf("%w (ca_key %s)", err, key.Ref())
	}
	return pki{ca: authority, serverCert: serverCert, key: closeBoth{key, rot}}, nil
}

// buildDirectory opens the registry, or with --only broker a replica of
// the enrollment service's (its change feed, read with the operator
// credentials of the data directory).
func (s *Server) buildDirectory() (*directory.Directory, error) {
	if s.cfg.Cluster.Enabled() {
		return s.buildClusterDirectory()
	}
	if s.cfg.Only == OnlyBroker {
		hc, err := operatorHTTPClient(s.layout)
		if err != nil {
			return nil, fmt.Errorf("broker-only needs the operator credentials to follow %s: %w", s.cfg.EnrollURL, err)
		}
		s.rep = replica.New(s.cfg.EnrollURL, hc, s.log.With("component", "replica"))
		return s.rep.Directory(), nil
	}
	reg, err := registry.Open(s.layout.RegistryDir(), registry.Options{Logger: s.log.With("component", "registry")})
	if err != nil {
		return nil, err
	}
	s.reg = reg
	return reg.Directory(), nil
}

// buildMetrics is the Prometheus registry of the process, with the
// certificate expiry gauges when the registry is here (dir is its view).
func buildMetrics(reg *registry.Registry, dir *directory.Directory) *prometheus.Registry {
	promReg := prometheus.NewRegistry()
	promReg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if reg != nil {
		for _, w := range []struct {
			label string
			d     time.Duration
		}{{"1d", 24 * time.Hour}, {"7d", 7 * 24 * time.Hour}, {"30d", 30 * 24 * time.Hour}} {
			promReg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "fleetgate_certificates_expiring", Help: "Unrevoked certificates expiring within the window.",
				ConstLabels: prometheus.Labels{"within": w.label},
			}, func() float64 { return float64(dir.CountExpiring(time.Now(), w.d)) }))
		}
	}
	return promReg
}

// BrokerConfig is the broker's configuration derived from cfg (without
// the trust anchors, certificate, directory, policy, logger and metrics,
// which come from the other parts).
func BrokerConfig(cfg Config) broker.Config {
	byteBurst := cfg.ByteBurst
	if byteBurst == 0 {
		byteBurst = 4 * int(cfg.ByteRate)
	}
	q := cfg.Queues
	if q.Device.MaxOffline == 0 {
		q.Device.MaxOffline = offlineQuota(cfg.MaxQueuedDevice)
	}
	if q.Service.MaxOffline == 0 {
		q.Service.MaxOffline = offlineQuota(cfg.MaxQueuedService)
	}
	return broker.Config{
		Addr: cfg.MQTTAddr, PersistDir: Layout{Dir: cfg.DataDir}.BrokerDir(),
		HandshakeTimeout: cfg.HandshakeTimeout, HelloTimeout: cfg.HelloTimeout,
		MaxPending: cfg.MaxPending, MaxPendingPerIP: cfg.MaxPendingPerIP, MaxPacketSize: cfg.MaxPacketSize,
		SweepInterval: cfg.SweepInterval, MaxQoS: byte(cfg.MaxQoS), ReceiveMaximum: uint16(cfg.ReceiveMaximum),
		TopicAliasMaximum: cfg.TopicAliasMaximum,
		Limits: broker.Limits{MsgRate: cfg.MsgRate, MsgBurst: cfg.MsgBurst, ByteRate: cfg.ByteRate, ByteBurst: byteBurst,
			MaxSubscriptions: cfg.MaxSubscriptions, SubRate: cfg.SubRate, SubBurst: cfg.SubBurst,
			MaxKeepalive: uint16(cfg.MaxKeepalive)},
		Queues: q,
		// devices in the field (Validate checked MinTLS)
		MinTLS: minTLS(cfg.MinTLS), WSSAddr: cfg.WSSListen,
	}
}

func minTLS(s string) uint16 {
	v, _ := broker.ParseMinTLS(s)
	return v
}

// offlineQuota maps max_queued_* (0: no quota) to a queue policy's
// MaxOffline (negative: no quota).
func offlineQuota(n int) int {
	if n == 0 {
		return -1
	}
	return n
}

// buildBroker builds and starts the broker (it listens from then on).
func (s *Server) buildBroker(p pki, dir *directory.Directory) error {
	policyPath := s.layout.PolicyPath(s.cfg.PolicyFile)
	policy, fileRules, err := loadPolicy(policyPath)
	if err != nil {
		return err
	}
	s.log.Info("policy in force", "file", policyName(policyPath), "file_rules", fileRules, "rules", len(policy.Rules()))
	bc := BrokerConfig(s.cfg)
	bc.TrustDomain, bc.ClientCAs, bc.ServerCert, bc.Directory = p.ca.TrustDomain, p.ca.ClientCAs(), p.serverCert, dir
	bc.Policy, bc.Logger, bc.Metrics = policy, s.log, s.prom
	if s.pki.stapler != nil {
		bc.ServerCertFunc = s.pki.stapler.get // with an OCSP staple
	}
	if err := s.clusterRouter(&bc); err != nil {
		return err
	}
	b, err := broker.New(bc)
	if err != nil {
		return err
	}
	s.bindClusterRouter(b)
	if err := b.Start(); err != nil {
		return err
	}
	s.broker = b
	s.addrs.MQTT = b.Addr()
	s.addrs.WSS = b.WSSAddr()
	s.policy = &brokerPolicy{b: b, layout: s.layout, file: s.cfg.PolicyFile, log: s.log}
	s.policy.inForce(policyPath, fileRules, len(policy.Rules()))
	if s.rep != nil {
		s.ready = append(s.ready, s.rep.Fresh)
	} else {
		s.ready = append(s.ready, func() bool { return true })
	}
	return nil
}

// brokerPolicy is the broker as the operator API sees it.
type brokerPolicy struct {
	b      *broker.Broker
	layout Layout
	file   string
	log    *slog.Logger
	shown  atomic.Pointer[api.PolicyShowResponse] // brokeradmin.go
}

func (p *brokerPolicy) Connected(name string) bool { return p.b.Connected(name) }

// ReloadPolicy reads the file the operator means now: the configured one,
// else the data directory's (also when it was written after the start).
// Never the built-in default: a reload that finds no file is refused, and
// the policy in force stays.
func (p *brokerPolicy) ReloadPolicy() (api.PolicyReloadResponse, error) {
	path, err := p.layout.ReloadPolicyPath(p.file)
	if err == nil {
		var pol *acl.Policy
		var n int
		if pol, n, err = acl.LoadFileRules(path); err == nil {
			p.b.SetPolicy(pol)
			res := api.PolicyReloadResponse{File: path, FileRules: n, Rules: len(pol.Rules())}
			p.log.Info("policy reloaded", "file", path, "file_rules", n, "rules", res.Rules)
			p.inForce(path, n, res.Rules)
			return res, nil
		}
	}
	p.log.Error("policy reload refused; the previous policy stays in force", "file", path, "err", err)
	return api.PolicyReloadResponse{File: path}, err
}

// EnrollConfig is the enrollment service's configuration derived from cfg
// (without the CA, registry, logger and metrics); it reads the TPM roots
// and the deny-list files.
func EnrollConfig(cfg Config, log *slog.Logger) (enroll.Config, error) {
	tpmRoots, err := LoadPEMDir(cfg.TPMRootsDir)
	if err != nil {
		return enroll.Config{}, fmt.Errorf("TPM manufacturer roots: %w", err)
	}
	var tpmDeny *attest.DenyList
	if cfg.TPMDenyList != "" {
		if tpmDeny, err = attest.LoadDenyList(cfg.TPMDenyList); err != nil {
			return enroll.Config{}, err
		}
		log.Info("TPM deny-list loaded", "file", cfg.TPMDenyList, "rules", len(tpmDeny.Rules))
	}
	return enroll.Config{DeviceCertTTL: cfg.DeviceCertTTL, TPMRoots: tpmRoots, TPMPolicy: cfg.TPMPolicy, TPMDenyList: tpmDeny}, nil
}

// buildEnrollment builds the enrollment API and the operator API on its
// listener, and binds the listener.
func (s *Server) buildEnrollment(p pki) error {
	log := s.log.With("component", "enroll")
	ec, err := EnrollConfig(s.cfg, s.log)
	if err != nil {
		return err
	}
	ec.CA, ec.Registry, ec.Logger, ec.Metrics = p.ca, s.reg, log, s.prom
	es, err := enroll.New(ec)
	if err != nil {
		return err
	}
	oc := operator.Config{CA: p.ca, Registry: s.reg, Enroll: es, Logger: log, CAFollower: s.caFollow}
	if s.policy != nil {
		oc.Broker = s.policy
	}
	op, err := operator.New(oc)
	if err != nil {
		return err
	}
	op.Register(es)
	if err := s.buildConsole(p, es, op); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.cfg.APIAddr)
	if err != nil {
		return fmt.Errorf("enrollment API listen %s: %w", s.cfg.APIAddr, err)
	}
	s.enroll = es
	s.addrs.API = ln.Addr().String()
	s.api = &httpPart{ln: ln, useTLS: true, srv: &http.Server{Handler: s.withOCSP(es.Handler()), TLSConfig: s.withStaple(s.caFollow.tlsConfig(es.TLSConfig(p.serverCert))),
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
		IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}}
	s.log.Info("enrollment API listening", "addr", s.addrs.API)
	return nil
}

// buildHealth builds the /healthz, /readyz and /metrics listener (none
// without a metrics address).
func (s *Server) buildHealth() error {
	if s.cfg.MetricsAddr == "" {
		return nil
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		for _, r := range s.ready {
			if !r() {
				http.Error(w, "not ready", http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(s.prom, promhttp.HandlerOpts{Registry: s.prom}))
	ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("metrics listen %s: %w", s.cfg.MetricsAddr, err)
	}
	s.addrs.Metrics = ln.Addr().String()
	s.log.Info("metrics listening", "addr", s.addrs.Metrics)
	s.metrics = &httpPart{ln: ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}}
	return nil
}

// LoadPEMDir returns a pool of every certificate in the *.pem, *.crt and
// *.cer files of dir; nil for an empty dir name.
func LoadPEMDir(dir string) (*x509.CertPool, error) {
	if dir == "" {
		return nil, nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	n := 0
	for _, e := range entries {
		switch filepath.Ext(e.Name()) {
		case ".pem", ".crt", ".cer":
		default:
			continue
		}
		certs, err := ca.ReadCertsFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, err
		}
		for _, c := range certs {
			pool.AddCert(c)
			n++
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("no certificate in %s", dir)
	}
	return pool, nil
}

// operatorHTTPClient is an HTTPS client presenting the operator
// certificate of the data directory and trusting its root CA.
func operatorHTTPClient(l Layout) (*http.Client, error) {
	oc := &operatorCert{l: l} // re-read after a rotation re-issued it (pki.go)
	if _, err := oc.get(nil); err != nil {
		return nil, err
	}
	root, err := ca.ReadCertFile(l.RootCert())
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 60 * time.Second, Transport: &freshConns{t: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: ca.NewPool(root), GetClientCertificate: oc.get}}}}, nil
}

// LoadPolicy loads a policy file; "" is the built-in default.
func LoadPolicy(path string) (*acl.Policy, error) {
	p, _, err := loadPolicy(path)
	return p, err
}

// loadPolicy is LoadPolicy with the number of rules written in the file.
func loadPolicy(path string) (*acl.Policy, int, error) {
	if path == "" {
		return acl.ParseFileRules("built-in default", []byte(acl.DefaultFile))
	}
	return acl.LoadFileRules(path)
}

func policyName(path string) string {
	if path == "" {
		return "built-in default"
	}
	return path
}
