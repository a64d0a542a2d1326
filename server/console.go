package server

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/console"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator"
)

// buildConsole builds the web console on its own TLS listener
// (--console-addr; none when empty) over the registry, the operator API's
// operations and the broker of this process, and mounts the route that
// mints its sign-in links on the admin API.
func (s *Server) buildConsole(p pki, es *enroll.Server, op *operator.Server) error {
	if s.cfg.ConsoleAddr == "" {
		return nil
	}
	cc := console.Config{Options: s.cfg.Console, Registry: s.reg, Operations: op, Gatherer: s.prom,
		Logger: s.log.With("component", "console")}
	// The operator's role, read from the registry on every request, as the
	// admin API does: a read-only operator's console shows and changes
	// nothing it may not. (A test may set its own.)
	if cc.Options.Role == nil {
		cc.Options.Role = func(id identity.Identity) (console.Role, error) {
			role, err := s.reg.OperatorRole(id.Name)
			if err != nil {
				return "", err
			}
			switch role {
			case registry.OperatorAdmin:
				return console.RoleAdmin, nil
			case registry.OperatorReadOnly:
				return console.RoleReadOnly, nil
			}
			return "", fmt.Errorf("operator %s has no role", id.Name)
		}
	}
	if s.broker != nil {
		cc.Broker = s.broker
	}
	c, err := console.New(cc)
	if err != nil {
		return err
	}
	if s.broker != nil {
		if err := s.broker.WatchSessions(c.OnSession); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", s.cfg.ConsoleAddr)
	if err != nil {
		return fmt.Errorf("console listen %s: %w", s.cfg.ConsoleAddr, err)
	}
	s.addrs.Console = ln.Addr().String()
	c.SetBaseURL(consoleURL(s.cfg.ConsoleURL, ln.Addr().(*net.TCPAddr)))
	op.RegisterConsole(es, c)
	s.consoleRun = c.Run
	// No WriteTimeout: the console sets a deadline per page and per event.
	s.console = &httpPart{ln: ln, useTLS: true, srv: &http.Server{Handler: c.Handler(),
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{p.serverCert}},
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute, MaxHeaderBytes: 16 << 10,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}}
	s.log.Info("web console listening", "addr", s.addrs.Console)
	return nil
}

// consoleURL is the start of the console's links: the configured URL, else
// https://localhost:<port> for a wildcard address (the server certificate
// names localhost), else the address itself.
func consoleURL(configured string, a *net.TCPAddr) string {
	if configured != "" {
		return configured
	}
	host := "localhost"
	if !a.IP.IsUnspecified() {
		host = a.IP.String()
	}
	return "https://" + net.JoinHostPort(host, fmt.Sprint(a.Port))
}

// runConsole samples the console's metrics until ctx ends.
func (s *Server) runConsole(ctx context.Context, wg *sync.WaitGroup) {
	if s.consoleRun == nil {
		return
	}
	wg.Add(1)
	go func() { defer wg.Done(); s.consoleRun(ctx) }()
}
