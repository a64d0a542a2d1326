package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/operator"
)

// pkiFollower makes a running server follow an issuing-CA rotation
// (docs/pki.md) without a restart: the directory's trusted issuers, the
// broker's client-CA pool (new handshakes at once, live sessions kept), the
// server certificate of the broker and of the API (re-issued by the new
// CA, same key), the data directory's operator certificate (re-issued and
// recorded), and, after a retirement, the close of sessions still on the
// retired CA. The admin API (operator/ca.go) calls it.
type pkiFollower struct {
	s   *Server
	ca  *ca.Authority
	dir *directory.Directory
	mu  sync.Mutex
	// cert is the server certificate in force.
	cert atomic.Pointer[tls.Certificate]
	// remote: in a broker apart, the trusted issuing CAs last read from
	// the enrollment service (its own ca does not change).
	remote atomic.Pointer[[]*x509.Certificate]
}

// trusted returns the trusted issuing CAs in force in this process.
func (f *pkiFollower) trusted() []*x509.Certificate {
	if r := f.remote.Load(); r != nil {
		return *r
	}
	return f.ca.TrustedCerts()
}

func newPKIFollower(s *Server, p pki, dir *directory.Directory) *pkiFollower {
	f := &pkiFollower{s: s, ca: p.ca, dir: dir}
	cert := p.serverCert
	f.cert.Store(&cert)
	dir.SetTrustedIssuers(p.ca.TrustedCerts())
	return f
}

// tlsConfig makes c serve the server certificate in force and name the
// trusted issuing CAs in force in its certificate request (a Go client
// sends its certificate only when its issuer is named there).
func (f *pkiFollower) tlsConfig(c *tls.Config) *tls.Config {
	c.Certificates = nil
	c.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return f.cert.Load(), nil }
	c.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cc := c.Clone()
		cc.GetConfigForClient = nil
		cc.ClientCAs = f.ca.ClientCAs()
		return cc, nil
	}
	return c
}

// CAChanged implements operator.CAFollower.
func (f *pkiFollower) CAChanged(rotated bool) (operator.CAFollowed, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var res operator.CAFollowed
	var errs []error
	f.dir.SetTrustedIssuers(f.ca.TrustedCerts())
	if b := f.s.broker; b != nil {
		b.SetClientCAs(f.ca.ClientCAs())
	}
	if rotated {
		if err := f.reissueServer(); err != nil {
			errs = append(errs, fmt.Errorf("server certificate: %w", err))
		} else {
			res.ServerReissued = true
		}
		if err := f.reissueOperator(); err != nil {
			errs = append(errs, fmt.Errorf("operator certificate: %w", err))
		} else {
			res.OperatorReissued = true
		}
	}
	if b := f.s.broker; b != nil {
		res.SessionsClosed = b.CloseUntrustedSessions()
	}
	return res, errors.Join(errs...)
}

// reissueServer re-issues the server certificate by the current issuing CA
// for the same names and key, writes it and puts it in force.
func (f *pkiFollower) reissueServer() error {
	l := f.s.layout
	old, err := ca.ReadCertFile(l.ServerCert())
	if err != nil {
		return err
	}
	key, err := ca.ReadKeyFile(l.ServerKey())
	if err != nil {
		return err
	}
	var hosts []string
	hosts = append(hosts, old.DNSNames...)
	for _, ip := range old.IPAddresses {
		hosts = append(hosts, ip.String())
	}
	c, err := f.ca.IssueServer(hosts, key.Public(), ca.ServerLifetime)
	if err != nil {
		return err
	}
	chain := append(ca.CertPEM(c), ca.CertPEM(f.ca.Issuing())...)
	if err := ca.WriteFileAtomic(l.ServerCert(), chain, 0o644); err != nil {
		return err
	}
	pair := tls.Certificate{Certificate: [][]byte{c.Raw, f.ca.Issuing().Raw}, PrivateKey: key, Leaf: c}
	f.cert.Store(&pair)
	if b := f.s.broker; b != nil {
		b.SetServerCertificate(pair)
	}
	return nil
}

// reissueOperator re-issues the data directory's operator certificate by
// the current issuing CA (same key), records it and writes it: the CLI on
// this machine keeps its access after the old CA is retired.
func (f *pkiFollower) reissueOperator() error {
	l := f.s.layout
	if _, err := os.Stat(l.OperatorCert()); err != nil {
		return nil // not in this data directory
	}
	old, err := ca.ReadCertFile(l.OperatorCert())
	if err != nil {
		return err
	}
	key, err := ca.ReadKeyFile(l.OperatorKey())
	if err != nil {
		return err
	}
	id, err := identity.FromCertificate(old, f.ca.TrustDomain)
	if err != nil {
		return err
	}
	if f.s.reg == nil {
		return errors.New("no registry in this process")
	}
	c, err := f.ca.Issue(id, key.Public(), ca.OperatorLifetime)
	if err != nil {
		return err
	}
	if err := f.s.reg.RecordCertificate(enroll.CertRecord(c, id)); err != nil {
		return err
	}
	return ca.WriteFileAtomic(l.OperatorCert(), append(ca.CertPEM(c), ca.CertPEM(f.ca.Issuing())...), 0o644)
}

// CompleteExternalRoot installs the first issuing CA certificate of a data
// directory initialised under an external root (ca.InitExternalRoot), once
// it checks, issues the server and operator certificates, and records the
// operator certificate in the registry, as Init does.
func CompleteExternalRoot(dataDir string, certPEM []byte) (*ca.InitResult, error) {
	res, err := ca.CompleteExternalRoot(dataDir, certPEM, ca.Options{})
	if err != nil {
		return nil, err
	}
	if _, err := InitClusterCA(dataDir); err != nil {
		return nil, err
	}
	reg, err := registry.Open(Layout{Dir: dataDir}.RegistryDir(), registry.Options{})
	if err != nil {
		return nil, err
	}
	defer reg.Close()
	op := res.Operator
	id, err := identity.FromCertificate(op, res.Authority.TrustDomain)
	if err != nil {
		return nil, err
	}
	if err := reg.RecordCertificate(enroll.CertRecord(op, id)); err != nil {
		return nil, err
	}
	if err := grantInitOperator(reg, id.Name, "init", "the first operator"); err != nil {
		return nil, err
	}
	reg.Audit(registry.AuditRecord{Actor: "init", Action: "init", Outcome: registry.OutcomeOK,
		Reason: "trust domain " + res.Authority.TrustDomain + " under an external root; issuing CA " + res.Authority.Current().ID})
	return res, nil
}

// ---- a broker apart (--only broker) ----

// issuerPoll is how often a broker-only process asks the enrollment
// service for its issuing CAs.
const issuerPoll = 2 * time.Second

// followRemote makes a broker-only process follow the issuing CAs of the
// enrollment service it replicates: GET /v1/ca/issuers every issuerPoll;
// on a change, the directory's trusted issuers, the broker's client-CA
// pool, the server certificate (re-read from the data directory) and the
// close of sessions on a retired CA, as CAChanged does in the process
// that rotated.
func (f *pkiFollower) followRemote(ctx context.Context, baseURL string) {
	hc, err := operatorHTTPClient(f.s.layout)
	if err != nil {
		f.s.log.Error("cannot follow the issuing CAs of the enrollment service", "err", err)
		return
	}
	last := ""
	for {
		if ids, err := f.pollRemote(ctx, hc, baseURL, last); err != nil {
			if ctx.Err() == nil {
				f.s.log.Warn("issuing CAs of the enrollment service", "err", err)
			}
		} else {
			last = ids
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(issuerPoll):
		}
	}
}

func (f *pkiFollower) pollRemote(ctx context.Context, hc *http.Client, baseURL, last string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, baseURL+api.PathCAIssuers, nil)
	if err != nil {
		return last, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return last, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return last, fmt.Errorf("GET %s: %s", api.PathCAIssuers, resp.Status)
	}
	var ir api.CAIssuersResponse
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&ir); err != nil {
		return last, err
	}
	var certs []*x509.Certificate
	var ids []string
	for _, t := range ir.Trusted {
		cs, err := ca.ParseCertsPEM([]byte(t.CertificatePEM))
		if err != nil {
			return last, err
		}
		// Trusted only as far as the root of this data directory vouches.
		if err := ca.CheckIssuingCert(cs[0], f.ca.Root, nil, time.Now()); err != nil {
			return last, fmt.Errorf("issuing CA %s: %w", t.ID, err)
		}
		certs = append(certs, cs[0])
		ids = append(ids, ca.IssuerID(cs[0]))
	}
	if len(certs) == 0 {
		return last, errors.New("no trusted issuing CA in the answer")
	}
	slices.Sort(ids)
	key := strings.Join(ids, ",")
	if key == last {
		return last, nil
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.dir.SetTrustedIssuers(certs)
	f.remote.Store(&certs)
	b := f.s.broker
	b.SetClientCAs(ca.NewPool(certs...))
	if pair, err := tls.LoadX509KeyPair(f.s.layout.ServerCert(), f.s.layout.ServerKey()); err == nil {
		b.SetServerCertificate(pair)
	}
	closed := b.CloseUntrustedSessions()
	if last != "" {
		f.s.log.Info("issuing CAs changed at the enrollment service; followed", "trusted", key, "current", ir.Current, "sessions_closed", closed)
	}
	return key, nil
}

// operatorCert is the data directory's operator certificate for a client
// that runs long (a broker-only process's feed): read again when its file
// changed, since a rotation re-issues it.
type operatorCert struct {
	l    Layout
	mu   sync.Mutex
	mod  time.Time
	cert *tls.Certificate
}

func (o *operatorCert) get(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	fi, err := os.Stat(o.l.OperatorCert())
	if err == nil && (o.cert == nil || !fi.ModTime().Equal(o.mod)) {
		c, err := tls.LoadX509KeyPair(o.l.OperatorCert(), o.l.OperatorKey())
		if err == nil {
			o.cert, o.mod = &c, fi.ModTime()
		} else if o.cert == nil {
			return nil, err
		}
	}
	if o.cert == nil {
		return nil, err
	}
	return o.cert, nil
}

// freshConns drops the kept-alive connections after a 401 answer: a
// connection made with a certificate the server no longer accepts (its
// issuing CA retired) is not reused; the next one presents the re-issued
// certificate.
type freshConns struct {
	t     *http.Transport
	stale atomic.Bool
}

func (f *freshConns) RoundTrip(r *http.Request) (*http.Response, error) {
	if f.stale.Swap(false) {
		f.t.CloseIdleConnections()
	}
	resp, err := f.t.RoundTrip(r)
	if err == nil && resp.StatusCode == http.StatusUnauthorized {
		f.stale.Store(true)
	}
	return resp, err
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// transport.
func (f *freshConns) CloseIdleConnections() { f.t.CloseIdleConnections() }
