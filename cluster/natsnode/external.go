package natsnode

// A NATS cluster the user runs (--nats-url): how fleetgate authenticates
// to it and checks that its servers sync JetStream writes before they
// acknowledge them (docs/cluster.md, "Securing NATS").

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// ExternalAuth is how fleetgate proves itself to an external NATS and
// which roots it trusts for it. Empty fields are not used: user and
// password may also be in the URLs (nats://user:password@host:port).
type ExternalAuth struct {
	// CAFile: the roots a tls:// server is verified against (PEM; default
	// the system's).
	CAFile string
	// CertFile and KeyFile: fleetgate's client certificate (mTLS).
	CertFile, KeyFile string
	// CredsFile: a NATS credentials file (user JWT and nkey seed).
	CredsFile string
}

// ErrPlaintext: an external NATS URL or monitoring URL without TLS.
var ErrPlaintext = errors.New("without TLS")

// CheckTLS refuses (ErrPlaintext, naming them) the NATS URLs
// (comma-separated) that are not tls:// and the monitoring URLs that are
// not https://: over plain TCP a password in the URL, every record and
// every acknowledgement cross the network readable and forgeable, and a
// /varz answer (the sync check) can be spoofed.
func CheckTLS(urls string, monitorURLs []string) error {
	var bad []string
	for _, s := range strings.Split(urls, ",") {
		s = strings.TrimSpace(s)
		if u, err := url.Parse(s); err != nil || !strings.EqualFold(u.Scheme, "tls") {
			bad = append(bad, redact(s))
		}
	}
	for _, s := range monitorURLs {
		if u, err := url.Parse(s); err != nil || !strings.EqualFold(u.Scheme, "https") {
			bad = append(bad, redact(s))
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("natsnode: %w: %s", ErrPlaintext, strings.Join(bad, ", "))
	}
	return nil
}

// Options are the nats.go options of a; the key and credentials files must
// be readable by their owner only.
func (a ExternalAuth) Options() ([]nats.Option, error) {
	var o []nats.Option
	if a.CAFile != "" {
		if _, err := loadPool(a.CAFile); err != nil {
			return nil, err
		}
		o = append(o, nats.RootCAs(a.CAFile))
	}
	if (a.CertFile == "") != (a.KeyFile == "") {
		return nil, errors.New("natsnode: a client certificate needs both its certificate and its key file")
	}
	if a.CertFile != "" {
		if err := ownerOnly(a.KeyFile); err != nil {
			return nil, err
		}
		if _, err := tls.LoadX509KeyPair(a.CertFile, a.KeyFile); err != nil {
			return nil, fmt.Errorf("natsnode: client certificate: %w", err)
		}
		o = append(o, nats.ClientCert(a.CertFile, a.KeyFile))
	}
	if a.CredsFile != "" {
		if err := ownerOnly(a.CredsFile); err != nil {
			return nil, err
		}
		o = append(o, nats.UserCredentials(a.CredsFile))
	}
	return o, nil
}

// HTTPClient is the client of CheckSync: https monitoring URLs are
// verified against CAFile when it is set.
func (a ExternalAuth) HTTPClient() (*http.Client, error) {
	t := &tls.Config{MinVersion: tls.VersionTLS12}
	if a.CAFile != "" {
		p, err := loadPool(a.CAFile)
		if err != nil {
			return nil, err
		}
		t.RootCAs = p
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: t}}, nil
}

func loadPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("natsnode: CA file: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("natsnode: CA file %s holds no PEM certificate", file)
	}
	return p, nil
}

// ownerOnly refuses a secret file that others than its owner may read.
func ownerOnly(file string) error {
	fi, err := os.Stat(file)
	if err != nil {
		return fmt.Errorf("natsnode: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("natsnode: %s has mode %04o; a key or credentials file must be 0600", file, fi.Mode().Perm())
	}
	return nil
}

// explainConnect adds to a connection error what the user can do about it.
func explainConnect(err error) error {
	s := err.Error()
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAuthRevoked),
		strings.Contains(s, "authorization violation"), strings.Contains(s, "authentication"):
		return fmt.Errorf("%w (the NATS server asks for credentials fleetgate does not have or refused them: "+
			"--nats-creds, user:password in --nats-url, or --nats-cert/--nats-key)", err)
	case strings.Contains(s, "x509:") || strings.Contains(s, "certificate"):
		return fmt.Errorf("%w (TLS: --nats-ca names the CA the servers' certificates are verified against)", err)
	case errors.Is(err, nats.ErrSecureConnRequired) || errors.Is(err, nats.ErrSecureConnWanted):
		return fmt.Errorf("%w (tls:// URLs, --nats-ca)", err)
	}
	return err
}

// ServerSync is one NATS server's JetStream sync setting, as its /varz
// reports it.
type ServerSync struct {
	URL, Server  string
	SyncAlways   bool
	SyncInterval time.Duration
}

// ErrUnsynced: a server acknowledges JetStream writes before it syncs them.
var ErrUnsynced = errors.New("NATS server acknowledges JetStream writes before syncing them")

// CheckSync reads the JetStream sync setting of each server from its HTTP
// monitoring endpoint (base URLs, as nats-server's -m / http: ... serve
// /varz) and returns ErrUnsynced, naming the servers, unless every one
// syncs before it acknowledges (`jetstream { sync_interval: always }`).
func CheckSync(ctx context.Context, hc *http.Client, monitorURLs []string) ([]ServerSync, error) {
	if len(monitorURLs) == 0 {
		return nil, errors.New("natsnode: no NATS monitoring URL to check the sync setting on")
	}
	var all []ServerSync
	var bad []string
	for _, u := range monitorURLs {
		s, err := varzSync(ctx, hc, u)
		if err != nil {
			return nil, err
		}
		all = append(all, s)
		if !s.SyncAlways {
			bad = append(bad, fmt.Sprintf("%s (%s: sync_interval %s)", s.Server, s.URL, s.SyncInterval))
		}
	}
	if len(bad) > 0 {
		return all, fmt.Errorf("natsnode: %w: %s; set `jetstream { sync_interval: always }` on every server", ErrUnsynced, strings.Join(bad, ", "))
	}
	return all, nil
}

func varzSync(ctx context.Context, hc *http.Client, base string) (ServerSync, error) {
	u := strings.TrimSuffix(base, "/") + "/varz"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return ServerSync{}, fmt.Errorf("natsnode: NATS monitoring URL %q: %w", base, err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return ServerSync{}, fmt.Errorf("natsnode: NATS monitoring: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return ServerSync{}, fmt.Errorf("natsnode: NATS monitoring %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return ServerSync{}, fmt.Errorf("natsnode: NATS monitoring %s: HTTP %d", u, resp.StatusCode)
	}
	var v struct {
		Name      string `json:"server_name"`
		JetStream struct {
			Config *struct {
				SyncInterval time.Duration `json:"sync_interval"`
				SyncAlways   bool          `json:"sync_always"`
			} `json:"config"`
		} `json:"jetstream"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return ServerSync{}, fmt.Errorf("natsnode: NATS monitoring %s: not varz: %w", u, err)
	}
	if v.JetStream.Config == nil {
		return ServerSync{}, fmt.Errorf("natsnode: NATS server %s (%s) does not run JetStream", v.Name, u)
	}
	return ServerSync{URL: base, Server: v.Name, SyncAlways: v.JetStream.Config.SyncAlways, SyncInterval: v.JetStream.Config.SyncInterval}, nil
}
