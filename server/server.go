// Package server assembles one fleetgate server process over one data
// directory (Layout): the directory of devices and certificates (the
// registry, or a replica of it when the broker runs apart), the CA, the
// enrollment API with the operator API on its listener, the MQTT broker,
// the health/metrics listener and the memory trimmer. New builds the parts
// (build.go, one builder each) and binds their listeners; Addrs says where
// they listen; Run runs them until the context ends. The first failure
// stops the rest, and Run waits for all of them.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/broker"
	bcluster "github.com/fleetgate/fleetgate/broker/cluster"
	"github.com/fleetgate/fleetgate/broker/replica"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/registry"
)

// Parts a process can run (Config.Only).
const (
	OnlyAll    = ""
	OnlyBroker = "broker"
	OnlyEnroll = "enroll"
)

// Addrs are the bound addresses, as written to Config.AddrFile.
type Addrs struct {
	MQTT    string `json:"mqtt,omitempty"`
	API     string `json:"api,omitempty"`
	Metrics string `json:"metrics,omitempty"`
	WSS     string `json:"wss,omitempty"`
	Console string `json:"console,omitempty"`
	OCSP    string `json:"ocsp,omitempty"`
}

// Server is one server process: its parts built and their listeners bound.
type Server struct {
	cfg    Config
	log    *slog.Logger
	layout Layout
	addrs  Addrs

	reg    *registry.Registry // nil with --only broker
	rep    *replica.Replica   // only with --only broker
	clu    *clusterPart       // only on a cluster node (cluster.go)
	router *bcluster.Router   // the broker across nodes (brokercluster.go)
	prom   *prometheus.Registry
	broker *broker.Broker
	policy *brokerPolicy
	enroll *enroll.Server
	// caFollow follows issuing-CA rotations (pki.go).
	caFollow *pkiFollower
	// api and metrics are the HTTP servers with their bound listeners.
	api, metrics *httpPart
	// console is the web console (--console-addr); consoleRun samples its
	// metrics.
	console    *httpPart
	consoleRun func(context.Context)
	// ready are the readiness checks of /readyz.
	ready []func() bool
	// pki: the CA key's store, OCSP responder and staple (ocsp.go).
	pki pkiParts
}

// httpPart is an HTTP server and its bound listener.
type httpPart struct {
	srv    *http.Server
	ln     net.Listener
	useTLS bool
}

// New builds the parts of cfg and binds their listeners: once it returns,
// the broker accepts connections and Addrs is known. Run serves; on an
// error New releases what it had built.
func New(cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: cfg.Logger, layout: Layout{Dir: cfg.DataDir}}
	if err := s.build(); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// build builds the parts, one builder each (build.go).
func (s *Server) build() error {
	cfg := s.cfg
	if err := s.listenOCSP(); err != nil {
		return err
	}
	pki, err := loadPKI(s.layout, cfg, s.addrs.OCSP)
	if err != nil {
		return err
	}
	s.pki.key = pki.key
	dir, err := s.buildDirectory()
	if err != nil {
		return err
	}
	if err := s.migrateOperatorRole(); err != nil { // operatorrole.go
		return err
	}
	s.prom = buildMetrics(s.reg, dir)
	registerOwnCertMetrics(s.prom, s.layout) // servercert.go
	s.registerOpsMetrics(dir)                // opsmetrics.go: CA expiry, revocation view age, devices
	s.caFollow = newPKIFollower(s, pki, dir)
	if err := s.buildOCSP(pki, dir); err != nil {
		return err
	}
	if cfg.Only != OnlyEnroll {
		if err := s.buildBroker(pki, dir); err != nil {
			return err
		}
	}
	if cfg.Only != OnlyBroker {
		if err := s.buildEnrollment(pki); err != nil {
			return err
		}
	}
	if err := s.buildHealth(); err != nil {
		return err
	}
	return nil
}

// Addrs returns the bound addresses.
func (s *Server) Addrs() Addrs { return s.addrs }

// Run serves until ctx is done, then stops every part and waits for them.
// It returns the first failure of a part, nil after a clean stop.
func (s *Server) Run(ctx context.Context) error {
	defer s.closeStores()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	fail := func(err error) {
		if err != nil && !errors.Is(err, context.Canceled) {
			cancel(err)
		}
	}
	if s.broker != nil {
		if s.cfg.Reload != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-ctx.Done():
						return
					case <-s.cfg.Reload:
						_, _ = s.policy.ReloadPolicy()
					}
				}
			}()
		}
		if s.rep != nil {
			wg.Add(2)
			go func() {
				defer wg.Done()
				fail(s.rep.Run(ctx))
			}()
			go func() { defer wg.Done(); s.caFollow.followRemote(ctx, s.cfg.EnrollURL) }()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-ctx.Done()
			stopped := s.boundClusterStop() // brokercluster.go
			if err := s.broker.Close(); err != nil {
				s.log.Warn("broker close", "err", err)
			}
			stopped()
		}()
	}
	if s.clu != nil {
		wg.Add(1)
		go func() { defer wg.Done(); fail(s.clu.run(ctx)) }()
		wg.Add(1)
		go func() { defer wg.Done(); fail(s.runClusterRouter(ctx)) }()
	}
	if s.enroll != nil {
		wg.Add(1)
		go func() { defer wg.Done(); s.enroll.Run(ctx) }() // refusal summaries
	}
	for _, p := range []*httpPart{s.api, s.metrics, s.console, s.pki.http} {
		if p != nil {
			p.serve(ctx, &wg, fail)
		}
	}
	s.runConsole(ctx, &wg)
	if s.cfg.AddrFile != "" {
		b, _ := json.Marshal(s.addrs)
		tmp := s.cfg.AddrFile + ".tmp"
		err := os.WriteFile(tmp, b, 0o644)
		if err == nil {
			err = os.Rename(tmp, s.cfg.AddrFile)
		}
		if err != nil {
			s.log.Warn("write addr file", "err", err)
		}
	}
	s.watchOwnCerts(ctx, &wg) // servercert.go
	wg.Add(1)
	go func() {
		defer wg.Done()
		trimMemory(ctx, func() { s.log.Debug("memory returned to the OS after a burst") })
	}()
	s.log.Info("fleetgate serving", "mqtt", s.addrs.MQTT, "api", s.addrs.API, "metrics", s.addrs.Metrics, "data_dir", s.cfg.DataDir)
	<-ctx.Done()
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// close releases what New built when it fails: the listeners, the broker
// and the stores.
func (s *Server) close() {
	for _, p := range []*httpPart{s.api, s.metrics, s.console, s.pki.http} {
		if p != nil {
			p.ln.Close()
		}
	}
	if s.broker != nil {
		if err := s.broker.Close(); err != nil {
			s.log.Warn("broker close", "err", err)
		}
	}
	s.closeStores()
}

func (s *Server) closeStores() {
	if s.reg != nil {
		s.reg.Close()
	}
	if s.clu != nil {
		s.clu.close()
	}
	s.pki.close()
}

// serve serves p until ctx is done, then shuts it down (5s grace).
func (p *httpPart) serve(ctx context.Context, wg *sync.WaitGroup, fail func(error)) {
	wg.Add(2)
	go func() {
		defer wg.Done()
		var err error
		if p.useTLS {
			err = p.srv.ServeTLS(p.ln, "", "")
		} else {
			err = p.srv.Serve(p.ln)
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
		_ = p.srv.Shutdown(sctx)
	}()
}
