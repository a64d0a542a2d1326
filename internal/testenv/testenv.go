// Package testenv starts a real fleetgate server for tests: a fresh data
// directory (real CA, real badger), the enrollment API and the broker on
// loopback ports, and helpers that enroll devices and services through the
// real API. Everything stops when the test ends. Its configuration is a
// server.Config made from server.Defaults(), as `fleetgate serve` makes
// its own.
package testenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/internal/fleetproc"
	"github.com/fleetgate/fleetgate/operator/client"
	"github.com/fleetgate/fleetgate/server"
)

// Gateway is a running in-process gateway.
type Gateway struct {
	DataDir string
	Addrs   server.Addrs
	CA      *ca.Authority
	Admin   *client.Client
	Logs    *SyncBuffer
	stop    func()
}

// SyncBuffer is a goroutine-safe log sink tests can search.
type SyncBuffer = fleetproc.Buffer

// Init creates a data directory with a fresh PKI, as `fleetgate init` does.
func Init(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "data")
	if _, err := server.Init(dir, ca.InitOptions{TrustDomain: "test.fleetgate", Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// Options tune Start: each field that is not zero replaces the default of
// its server.Config field (Limits and Queues field by field).
type Options struct {
	DataDir          string
	HandshakeTimeout time.Duration
	MaxPending       int
	DeviceCertTTL    time.Duration
	SweepInterval    time.Duration
	Limits           broker.Limits
	Queues           broker.Queues
	MaxPendingPerIP  int
	// TPMRootsDir holds PEM files of trusted TPM manufacturer roots.
	TPMRootsDir string
	// TPMPolicy is "allowlist" (default) or "manufacturer".
	TPMPolicy string
}

// Config is the server configuration of a test: server.Defaults() with o
// applied, on loopback ports, over a fresh data directory unless o names
// one.
func Config(t testing.TB, o Options) server.Config {
	t.Helper()
	cfg := server.Defaults()
	cfg.DataDir = o.DataDir
	if cfg.DataDir == "" {
		cfg.DataDir = Init(t)
	}
	cfg.MQTTAddr, cfg.APIAddr, cfg.MetricsAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	set := func(dst *int, v int) {
		if v != 0 {
			*dst = v
		}
	}
	setF := func(dst *float64, v float64) {
		if v != 0 {
			*dst = v
		}
	}
	setD := func(dst *time.Duration, v time.Duration) {
		if v != 0 {
			*dst = v
		}
	}
	setD(&cfg.HandshakeTimeout, o.HandshakeTimeout)
	setD(&cfg.DeviceCertTTL, o.DeviceCertTTL)
	setD(&cfg.SweepInterval, o.SweepInterval)
	set(&cfg.MaxPending, o.MaxPending)
	set(&cfg.MaxPendingPerIP, o.MaxPendingPerIP)
	setF(&cfg.MsgRate, o.Limits.MsgRate)
	set(&cfg.MsgBurst, o.Limits.MsgBurst)
	setF(&cfg.ByteRate, o.Limits.ByteRate)
	set(&cfg.ByteBurst, o.Limits.ByteBurst)
	set(&cfg.MaxSubscriptions, o.Limits.MaxSubscriptions)
	setF(&cfg.SubRate, o.Limits.SubRate)
	set(&cfg.SubBurst, o.Limits.SubBurst)
	cfg.Queues = o.Queues
	if o.TPMRootsDir != "" {
		cfg.TPMRootsDir = o.TPMRootsDir
	}
	if o.TPMPolicy != "" {
		cfg.TPMPolicy = o.TPMPolicy
	}
	return cfg
}

// Start runs a server on loopback until the test ends.
func Start(t testing.TB, o Options) *Gateway {
	t.Helper()
	return StartConfig(t, Config(t, o))
}

// StartConfig runs a server with cfg (made from server.Defaults() or
// Config) until the test ends; its addresses are written to a file of the
// test and its log is kept in Logs.
func StartConfig(t testing.TB, cfg server.Config) *Gateway {
	t.Helper()
	g := &Gateway{DataDir: cfg.DataDir, Logs: &SyncBuffer{}}
	addrFile := filepath.Join(t.TempDir(), "addrs.json")
	cfg.AddrFile = addrFile
	cfg.Logger = slog.New(slog.NewTextHandler(g.Logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	done, exited := make(chan error, 1), make(chan struct{})
	go func() {
		defer close(exited)
		s, err := server.New(cfg)
		if err != nil {
			done <- err
			return
		}
		done <- s.Run(ctx)
	}()
	var once sync.Once
	g.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("gateway: %v", err)
			}
		})
	}
	t.Cleanup(g.stop)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log of gateway %s (last lines at INFO and above):\n%s", cfg.DataDir, tailLog(g.Logs.String(), 150))
		}
	})
	a, err := fleetproc.WaitAddrs(ctx, addrFile, 20*time.Second, exited)
	if errors.Is(err, fleetproc.ErrExited) {
		err = <-done
		done <- err
		t.Fatalf("gateway exited: %v\n%s", err, g.Logs.String())
	}
	if err != nil {
		t.Fatalf("gateway did not start: %v\n%s", err, g.Logs.String())
	}
	g.Addrs = server.Addrs(a)
	caOpts := ca.Options{}
	if cfg.CAKey != "" { // the issuing key in a key store
		k, err := keystore.Open(cfg.CAKey)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { k.Close() })
		caOpts.Key = k
		rot := keystore.NewRotation(cfg.CAKey) // the keys of rotated issuing CAs, in the same store
		t.Cleanup(func() { rot.Close() })
		caOpts.OpenKey, caOpts.NewKey = rot.OpenKey, rot.NewKey
	}
	if g.CA, err = ca.Load(cfg.DataDir, caOpts); err != nil {
		t.Fatal(err)
	}
	if g.Admin, err = client.New("https://"+g.Addrs.API, client.FromDataDir(cfg.DataDir)); err != nil {
		t.Fatal(err)
	}
	return g
}

// Stop stops the gateway now (it is also stopped at test end).
func (g *Gateway) Stop() { g.stop() }

// URL is the enrollment API base URL.
func (g *Gateway) URL() string { return "https://" + g.Addrs.API }

// Roots is a pool with the root CA.
func (g *Gateway) Roots() *x509.CertPool { return g.CA.Roots() }

// Token mints a bootstrap token through the admin API.
func (g *Gateway) Token(t testing.TB, device, group string, ttl time.Duration) string {
	t.Helper()
	var r *api.TokenCreateResponse
	err := whileStale(func() (err error) {
		r, err = g.Admin.CreateToken(context.Background(), api.TokenCreateRequest{DeviceID: device, Group: group, TTL: ttl})
		return err
	})
	if err != nil {
		t.Fatalf("create token for %s: %v", device, err)
	}
	return r.Token
}

// Device returns an unenrolled device with a software key.
func (g *Gateway) Device(t testing.TB, id string) *devicesdk.Device {
	t.Helper()
	dir := filepath.Join(t.TempDir(), id)
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: g.URL(), RootCAs: g.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// EnrollDevice enrolls a software-key device through a token.
func (g *Gateway) EnrollDevice(t testing.TB, id, group string) *devicesdk.Device {
	t.Helper()
	d := g.Device(t, id)
	if err := d.EnrollWithToken(context.Background(), g.Token(t, id, group, time.Hour)); err != nil {
		t.Fatalf("enroll %s: %v", id, err)
	}
	return d
}

// Service issues a service certificate through the admin API.
func (g *Gateway) Service(t testing.TB, name string) tls.Certificate {
	t.Helper()
	var r *api.ServiceIssueResponse
	err := whileStale(func() (err error) {
		r, err = g.Admin.IssueService(context.Background(), api.ServiceIssueRequest{Name: name})
		return err
	})
	if err != nil {
		t.Fatalf("issue service %s: %v", name, err)
	}
	c, err := tls.X509KeyPair([]byte(r.CertificateChainPEM), []byte(r.PrivateKeyPEM))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// MQTT connects a paho client with cert and client ID; it fails the test on
// error unless the caller checks the returned error. opts adjust paho's
// options before connecting.
func (g *Gateway) MQTT(t testing.TB, clientID string, cert *tls.Certificate, opts ...func(*paho.ClientOptions)) (paho.Client, error) {
	t.Helper()
	tcfg := &tls.Config{RootCAs: g.Roots(), ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		// Always send the certificate, even one the server's CA list does
		// not name (crypto/tls would otherwise send none).
		tcfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	o := paho.NewClientOptions().AddBroker("tls://" + g.Addrs.MQTT).SetClientID(clientID).
		SetTLSConfig(tcfg).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(10 * time.Second).SetOrderMatters(false)
	for _, fn := range opts {
		fn(o)
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(15 * time.Second) {
		return nil, errors.New("connect timed out")
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Disconnect(100) })
	return c, nil
}

// Metrics returns the /metrics text.
func (g *Gateway) Metrics(t testing.TB) string {
	t.Helper()
	resp, err := HTTPGet("http://" + g.Addrs.Metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// Eventually polls fn until it returns nil or the deadline passes.
func Eventually(t testing.TB, d time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	var err error
	for {
		if err = fn(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// tailLog is the last n lines of a text log that are not DEBUG lines: what
// a failed test prints of a gateway's log (CI shows only the output).
func tailLog(log string, n int) string {
	lines := strings.Split(strings.TrimRight(log, "\n"), "\n")
	var keep []string
	for i := len(lines) - 1; i >= 0 && len(keep) < n; i-- {
		if !strings.Contains(lines[i], "level=DEBUG") {
			keep = append(keep, lines[i])
		}
	}
	slices.Reverse(keep)
	return strings.Join(keep, "\n")
}

// whileStale calls fn again, for up to 30 s, while it is refused with 503
// directory_stale: a cluster node on a loaded machine may miss its
// freshness bound for a moment, and then refuses operators too (the tests
// that assert that refusal call the API directly).
func whileStale(fn func() error) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := fn()
		if !IsStale(err) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// IsStale reports whether err is the answer of a node that vouches for no
// certificate while its view of revocations is stale: 503
// directory_stale.
func IsStale(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Status == http.StatusServiceUnavailable && ae.Code == "directory_stale"
}

// IsUnavailable reports whether err is a node's answer that it cannot
// serve the request for now and a retry may succeed: 503 directory_stale,
// or 503 store_unavailable (the cluster's store without a quorum, or
// electing its leaders after a heal).
func IsUnavailable(err error) bool {
	var ae *api.Error
	return errors.As(err, &ae) && ae.Status == http.StatusServiceUnavailable && (ae.Code == "directory_stale" || ae.Code == "store_unavailable")
}
