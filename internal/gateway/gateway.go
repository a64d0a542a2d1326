// Package gateway assembles one fleetgate server process: the enrollment
// HTTPS API, the MQTT broker, and the health/metrics listener, over one data
// directory. Every part runs until the context ends; the first failure
// stops the rest, and Run waits for all of them.
package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
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
	"github.com/fleetgate/fleetgate/enroll/registry"
)

// Parts a process can run.
const (
	OnlyAll    = ""
	OnlyBroker = "broker"
	OnlyEnroll = "enroll"
)

// Config of one server process.
type Config struct {
	DataDir     string
	MQTTAddr    string
	APIAddr     string
	MetricsAddr string
	// Only runs one part ("broker" or "enroll"); empty runs both.
	Only             string
	DeviceCertTTL    time.Duration
	HandshakeTimeout time.Duration
	MaxPending       int
	MaxPacketSize    uint32
	// TopicAliasMaximum per MQTT 5 client (0: broker default 16; negative:
	// none).
	TopicAliasMaximum int
	// AddrFile, if set, receives the bound addresses as JSON once every
	// listener is up (useful with port 0).
	AddrFile string
	// TPMRootsDir holds PEM files of trusted TPM manufacturer roots.
	TPMRootsDir string
	// TPMPolicy: "allowlist" (default) or "manufacturer".
	TPMPolicy string
	// TPMDenyListFile is the TPM deny-list (YAML, enroll/attest.DenyList);
	// empty: no rules (ROCA-vulnerable EKs are refused anyway).
	TPMDenyListFile string
	// SweepInterval of the broker's expired-session sweep (default 10s).
	SweepInterval time.Duration
	// Limits per client, and connection limits (zero: broker defaults).
	Limits broker.Limits
	// Queues are the broker's outbound queue policies (zero: defaults).
	Queues          broker.Queues
	MaxPendingPerIP int
	MaxQoS          byte
	ReceiveMaximum  uint16
	// PolicyFile is the broker's topic policy (YAML, broker/acl). Empty:
	// <DataDir>/policy.yaml if it exists, else the built-in default.
	PolicyFile string
	// Reload, when it receives, reloads the policy file (SIGHUP). A bad
	// file is refused with every error; the old policy stays.
	Reload <-chan struct{}
	// EnrollURL is the enrollment service a broker-only process follows
	// (its registry change feed), with the operator credentials of DataDir.
	EnrollURL string
	// HelloTimeout bounds the wait for a connection's first complete TLS
	// ClientHello (zero: broker default).
	HelloTimeout time.Duration
}

// Addrs are the bound addresses, as written to AddrFile.
type Addrs struct {
	MQTT    string `json:"mqtt,omitempty"`
	API     string `json:"api,omitempty"`
	Metrics string `json:"metrics,omitempty"`
}

// Paths inside a data directory.
const (
	RegistryDir = "registry"
	BrokerDir   = "broker"
)

// Run serves until ctx is done.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	authority, err := ca.Load(cfg.DataDir, ca.Options{})
	if err != nil {
		return err
	}
	serverCert, err := tls.LoadX509KeyPair(filepath.Join(cfg.DataDir, ca.ServerCertFile), filepath.Join(cfg.DataDir, ca.ServerKeyFile))
	if err != nil {
		return fmt.Errorf("server TLS certificate: %w", err)
	}
	var reg *registry.Registry
	var dir *directory.Directory
	var rep *replica.Replica
	if cfg.Only == OnlyBroker {
		hc, err := operatorClient(cfg.DataDir)
		if err != nil {
			return fmt.Errorf("broker-only needs the operator credentials to follow %s: %w", cfg.EnrollURL, err)
		}
		rep = replica.New(cfg.EnrollURL, hc, log.With("component", "replica"))
		dir = rep.Directory()
	} else {
		reg, err = registry.Open(filepath.Join(cfg.DataDir, RegistryDir), registry.Options{Logger: log.With("component", "registry")})
		if err != nil {
			return err
		}
		defer reg.Close()
		dir = reg.Directory()
	}

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

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	var addrs Addrs
	var ready []func() bool
	var online func(string) bool
	fail := func(err error) {
		if err != nil && !errors.Is(err, context.Canceled) {
			cancel(err)
		}
	}

	var reloadPolicy func() (api.PolicyReloadResponse, error)
	if cfg.Only != OnlyEnroll {
		policyPath := PolicyPath(cfg)
		policy, fileRules, err := loadPolicy(policyPath)
		if err != nil {
			return err
		}
		log.Info("policy in force", "file", policyName(policyPath), "file_rules", fileRules, "rules", len(policy.Rules()))
		b, err := broker.New(broker.Config{
			Policy: policy,
			Addr:   cfg.MQTTAddr, TrustDomain: authority.TrustDomain, ClientCAs: authority.ClientCAs(), ServerCert: serverCert, Directory: dir,
			Logger: log, Metrics: promReg, PersistDir: filepath.Join(cfg.DataDir, BrokerDir),
			HandshakeTimeout: cfg.HandshakeTimeout, MaxPending: cfg.MaxPending, MaxPacketSize: cfg.MaxPacketSize,
			SweepInterval: cfg.SweepInterval, Limits: cfg.Limits, MaxPendingPerIP: cfg.MaxPendingPerIP, Queues: cfg.Queues,
			MaxQoS: cfg.MaxQoS, ReceiveMaximum: cfg.ReceiveMaximum, TopicAliasMaximum: cfg.TopicAliasMaximum,
			HelloTimeout: cfg.HelloTimeout,
		})
		if err != nil {
			return err
		}
		if err := b.Start(); err != nil {
			return err
		}
		addrs.MQTT = b.Addr()
		online = b.Connected
		// A reload reads the file the operator means now: the configured
		// one, else the data directory's (also when it was written after
		// the start). Never the built-in default: a reload that finds no
		// file is refused, and the policy in force stays.
		reloadPolicy = func() (api.PolicyReloadResponse, error) {
			path, err := ReloadPolicyPath(cfg)
			if err == nil {
				var p *acl.Policy
				var n int
				if p, n, err = acl.LoadFileRules(path); err == nil {
					b.SetPolicy(p)
					res := api.PolicyReloadResponse{File: path, FileRules: n, Rules: len(p.Rules())}
					log.Info("policy reloaded", "file", path, "file_rules", n, "rules", res.Rules)
					return res, nil
				}
			}
			log.Error("policy reload refused; the previous policy stays in force", "file", path, "err", err)
			return api.PolicyReloadResponse{File: path}, err
		}
		if cfg.Reload != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-ctx.Done():
						return
					case <-cfg.Reload:
						_, _ = reloadPolicy()
					}
				}
			}()
		}
		ready = append(ready, func() bool { return true })
		if rep != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fail(rep.Run(ctx))
			}()
			ready[len(ready)-1] = rep.Fresh
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-ctx.Done()
			if err := b.Close(); err != nil {
				log.Warn("broker close", "err", err)
			}
		}()
	}

	if cfg.Only != OnlyBroker {
		tpmRoots, err := LoadPEMDir(cfg.TPMRootsDir)
		if err != nil {
			return fmt.Errorf("TPM manufacturer roots: %w", err)
		}
		var tpmDeny *attest.DenyList
		if cfg.TPMDenyListFile != "" {
			if tpmDeny, err = attest.LoadDenyList(cfg.TPMDenyListFile); err != nil {
				return err
			}
			log.Info("TPM deny-list loaded", "file", cfg.TPMDenyListFile, "rules", len(tpmDeny.Rules))
		}
		es, err := enroll.New(enroll.Config{CA: authority, Registry: reg, Logger: log.With("component", "enroll"),
			Metrics: promReg, DeviceCertTTL: cfg.DeviceCertTTL, TPMRoots: tpmRoots, TPMPolicy: cfg.TPMPolicy, TPMDenyList: tpmDeny,
			Online: online, ReloadPolicy: reloadPolicy})
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() { defer wg.Done(); es.Run(ctx) }() // refusal summaries
		ln, err := net.Listen("tcp", cfg.APIAddr)
		if err != nil {
			cancel(err)
			wg.Wait()
			return fmt.Errorf("enrollment API listen %s: %w", cfg.APIAddr, err)
		}
		addrs.API = ln.Addr().String()
		srv := &http.Server{Handler: es.Handler(), TLSConfig: es.TLSConfig(serverCert),
			ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, WriteTimeout: 30 * time.Second,
			IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
		log.Info("enrollment API listening", "addr", addrs.API)
		serveHTTP(ctx, &wg, srv, ln, true, fail)
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		for _, r := range ready {
			if !r() {
				http.Error(w, "not ready", http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("/metrics", promhttp.HandlerFor(promReg, promhttp.HandlerOpts{Registry: promReg}))
	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			cancel(err)
			wg.Wait()
			return fmt.Errorf("metrics listen %s: %w", cfg.MetricsAddr, err)
		}
		addrs.Metrics = ln.Addr().String()
		log.Info("metrics listening", "addr", addrs.Metrics)
		serveHTTP(ctx, &wg, &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln, false, fail)
	}

	if cfg.AddrFile != "" {
		b, _ := json.Marshal(addrs)
		tmp := cfg.AddrFile + ".tmp"
		if err := os.WriteFile(tmp, b, 0o644); err == nil {
			err = os.Rename(tmp, cfg.AddrFile)
		}
		if err != nil {
			log.Warn("write addr file", "err", err)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		trimMemory(ctx, func() { log.Debug("memory returned to the OS after a burst") })
	}()
	log.Info("fleetgate serving", "mqtt", addrs.MQTT, "api", addrs.API, "metrics", addrs.Metrics, "data_dir", cfg.DataDir)
	<-ctx.Done()
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func serveHTTP(ctx context.Context, wg *sync.WaitGroup, srv *http.Server, ln net.Listener, useTLS bool, fail func(error)) {
	wg.Add(2)
	go func() {
		defer wg.Done()
		var err error
		if useTLS {
			err = srv.ServeTLS(ln, "", "")
		} else {
			err = srv.Serve(ln)
		}
		if !errors.Is(err, http.ErrServerClosed) {
			fail(err)
		}
	}()
	go func() {
		defer wg.Done()
		<-ctx.Done()
		sctx, c := context.WithTimeout(context.Background(), 5*time.Second)
		defer c()
		_ = srv.Shutdown(sctx)
	}()
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

// operatorClient is an HTTPS client presenting the operator certificate of
// dataDir and trusting its root CA.
func operatorClient(dataDir string) (*http.Client, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dataDir, ca.OperatorCertFile), filepath.Join(dataDir, ca.OperatorKeyFile))
	if err != nil {
		return nil, err
	}
	root, err := ca.ReadCertFile(filepath.Join(dataDir, ca.RootCertFile))
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: ca.NewPool(root), Certificates: []tls.Certificate{cert}}}}, nil
}

// PolicyFileName is the policy file looked for in a data directory.
const PolicyFileName = "policy.yaml"

// PolicyPath is the policy file cfg names, or the data directory's, or ""
// (the built-in default).
func PolicyPath(cfg Config) string {
	if cfg.PolicyFile != "" {
		return cfg.PolicyFile
	}
	p := filepath.Join(cfg.DataDir, PolicyFileName)
	if _, err := os.Stat(p); err == nil {
		return p
	}
	return ""
}

// ReloadPolicyPath is the file a policy reload reads: the configured one
// (which must still exist), else <DataDir>/policy.yaml if it exists now.
// Without either it is an error: a reload never falls back to the built-in
// default silently.
func ReloadPolicyPath(cfg Config) (string, error) {
	if cfg.PolicyFile != "" {
		return cfg.PolicyFile, nil
	}
	p := filepath.Join(cfg.DataDir, PolicyFileName)
	if _, err := os.Stat(p); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return p, fmt.Errorf("no policy file to reload: no --policy is configured and %s does not exist (write it, e.g. from `fleetgate policy default`)", p)
		}
		return p, fmt.Errorf("policy: %w", err)
	}
	return p, nil
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
