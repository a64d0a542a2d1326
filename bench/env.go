package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	adminclient "github.com/fleetgate/fleetgate/operator/client"
)

// BackendName is the service identity of the telemetry subscriber.
const BackendName = "bench-backend"

// Env is one benchmark run's working directory, PKI and enrolled identities.
type Env struct {
	Work            string // working directory (fleetgate data dir, certs, logs)
	FleetgateBin    string
	ExtraServeFlags []string
	Logf            func(string, ...any)
	// HybridKeyExchange makes the generator offer Go's default
	// post-quantum hybrid key exchange (X25519MLKEM768) first. Off: X25519
	// only, which is what Mosquitto (OpenSSL 3.0) can negotiate, so both
	// brokers do the same key exchange.
	HybridKeyExchange bool

	Roots   *x509.CertPool
	Devices []Identity // enrolled devices, reused for both brokers
	Backend Identity

	tpmMfr *swtpm.Manufacturer
}

// Identity is a client certificate and its name (client ID = CN = name).
type Identity struct {
	Name string
	Cert tls.Certificate
}

// DataDir is fleetgate's data directory.
func (e *Env) DataDir() string { return filepath.Join(e.Work, "fleetgate-data") }

// DeviceID names device i.
func DeviceID(i int) string { return fmt.Sprintf("bench-%05d", i) }

// Init creates the PKI with `fleetgate init`.
func (e *Env) Init(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(e.DataDir(), "ca", "root.crt")); err == nil {
		return e.loadRoots()
	}
	// the cluster scenarios' nodes (a copy of this directory) listen on
	// 127.0.0.1..3, as docs/cluster.md's `fleetgate init --host` has them
	out, err := exec.CommandContext(ctx, e.FleetgateBin, "init", "--data-dir", e.DataDir(),
		"--host", "127.0.0.1", "--host", "127.0.0.2", "--host", "127.0.0.3").CombinedOutput()
	if err != nil {
		return fmt.Errorf("fleetgate init: %v: %s", err, out)
	}
	return e.loadRoots()
}

func (e *Env) loadRoots() error {
	b, err := os.ReadFile(filepath.Join(e.DataDir(), "ca", "root.crt"))
	if err != nil {
		return err
	}
	e.Roots = x509.NewCertPool()
	if !e.Roots.AppendCertsFromPEM(b) {
		return errors.New("root.crt: no certificate")
	}
	return nil
}

// Admin returns an admin API client of the running fleetgate.
func (e *Env) Admin(fg *Broker) (*adminclient.Client, error) {
	return adminclient.New("https://"+fg.API, adminclient.FromDataDir(e.DataDir()))
}

// Enroll makes sure n devices and the backend service are enrolled (token
// path, in parallel), reusing those a previous run of the same work
// directory left, and loads their certificates.
func (e *Env) Enroll(ctx context.Context, fg *Broker, n int) error {
	admin, err := e.Admin(fg)
	if err != nil {
		return err
	}
	bdir := filepath.Join(e.Work, "backend")
	if _, err := os.Stat(filepath.Join(bdir, "key.pem")); err != nil {
		resp, err := admin.IssueService(ctx, api.ServiceIssueRequest{Name: BackendName})
		if err != nil {
			return fmt.Errorf("issue backend service: %w", err)
		}
		os.MkdirAll(bdir, 0o700)
		if err := os.WriteFile(filepath.Join(bdir, "cert.pem"), []byte(resp.CertificateChainPEM), 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(bdir, "key.pem"), []byte(resp.PrivateKeyPEM), 0o600); err != nil {
			return err
		}
	}
	bc, err := tls.LoadX509KeyPair(filepath.Join(bdir, "cert.pem"), filepath.Join(bdir, "key.pem"))
	if err != nil {
		return fmt.Errorf("backend certificate: %w", err)
	}
	e.Backend = Identity{Name: BackendName, Cert: bc}

	e.Devices = make([]Identity, n)
	var done, enrolled atomic.Int64
	errs := make([]error, n)
	start := time.Now()
	// Every device's error is kept (errors.Join below); a worker stops at
	// its first.
	_ = parallel(ctx, n, 16, func(i int) error {
		id := DeviceID(i)
		dir := filepath.Join(e.Work, "devices", id)
		chain, key := filepath.Join(dir, devicesdk.ChainFile), filepath.Join(dir, devicesdk.SoftKeyFile)
		if _, err := os.Stat(chain); err != nil {
			if errs[i] = e.enrollToken(ctx, admin, id, dir, fg.API); errs[i] != nil {
				return errs[i]
			}
			enrolled.Add(1)
		}
		c, err := tls.LoadX509KeyPair(chain, key)
		if err != nil {
			errs[i] = fmt.Errorf("%s: %w", id, err)
			return errs[i]
		}
		e.Devices[i] = Identity{Name: id, Cert: c}
		if d := done.Add(1); d%2000 == 0 {
			e.Logf("  %d/%d device identities ready", d, n)
		}
		return nil
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	e.Logf("  %d devices ready (%d enrolled now, in %s)", n, enrolled.Load(), time.Since(start).Round(time.Millisecond))
	return nil
}

func (e *Env) enrollToken(ctx context.Context, admin *adminclient.Client, id, dir, api_ string) error {
	tok, err := admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: id, Group: "bench", TTL: time.Hour})
	if err != nil {
		return fmt.Errorf("%s: token: %w", id, err)
	}
	return enrollWithToken(ctx, id, dir, "https://"+api_, e.Roots, tok.Token)
}

func enrollWithToken(ctx context.Context, id, dir, url string, roots *x509.CertPool, token string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		return err
	}
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: url, RootCAs: roots})
	if err != nil {
		return err
	}
	if err := dev.EnrollWithToken(ctx, token); err != nil {
		return fmt.Errorf("%s: enroll: %w", id, err)
	}
	return nil
}

// ClientTLS is the TLS configuration of one identity; cache enables TLS 1.3
// session resumption.
func (e *Env) ClientTLS(id Identity, cache tls.ClientSessionCache) *tls.Config {
	c := &tls.Config{
		MinVersion:         tls.VersionTLS13,
		RootCAs:            e.Roots,
		ServerName:         "localhost",
		Certificates:       []tls.Certificate{id.Cert},
		ClientSessionCache: cache,
		CurvePreferences:   []tls.CurveID{tls.X25519},
	}
	if e.HybridKeyExchange {
		c.CurvePreferences = nil // Go's default: X25519MLKEM768, then X25519, ...
	}
	return c
}
