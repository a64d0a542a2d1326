package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// DefaultHosts are the names `fleetgate init` puts in the server
// certificate besides the --host names (unless --no-default-hosts), so that
// the commands of the quickstart, which use https://localhost:8443, work on
// the gateway itself.
var DefaultHosts = []string{"localhost", "127.0.0.1", "::1"}

// ExpiryWarning is how long before the server or operator certificate
// expires that the server warns (log line, daily) and
// fleetgate_own_certificate_expiring says 1.
const ExpiryWarning = 30 * 24 * time.Hour

// WithDefaultHosts returns hosts with DefaultHosts appended unless noDefaults,
// without duplicates (first occurrence kept, case-insensitive for names).
func WithDefaultHosts(hosts []string, noDefaults bool) []string {
	all := slices.Clone(hosts)
	if !noDefaults {
		all = append(all, DefaultHosts...)
	}
	return uniqueHosts(all)
}

func uniqueHosts(hosts []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		k := strings.ToLower(h)
		if ip := net.ParseIP(h); ip != nil {
			k = ip.String()
		}
		if h == "" || seen[k] {
			continue
		}
		seen[k] = true
		out = append(out, h)
	}
	return out
}

// CertHosts returns the DNS names and IP addresses a server certificate
// holds, in that order.
func CertHosts(c *x509.Certificate) []string {
	out := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		out = append(out, ip.String())
	}
	return out
}

// ServerCertificate reads the server certificate of dataDir.
func ServerCertificate(dataDir string) (*x509.Certificate, error) {
	return ca.ReadCertFile(Layout{Dir: dataDir}.ServerCert())
}

// RenewServerCert issues a new server certificate (and key) for hosts with
// the issuing CA of dataDir, for another ca.ServerLifetime, and replaces
// tls/server.{crt,key} atomically. The running server reads them at start:
// restart it to serve the new one. caKey is the issuing CA's key as
// ca_key names it ("": the data directory's file).
func RenewServerCert(dataDir, caKey string, hosts []string) (*x509.Certificate, error) {
	hosts = uniqueHosts(hosts)
	if len(hosts) == 0 {
		return nil, fmt.Errorf("server certificate: no host name left")
	}
	a, closeKeys, err := loadSigningCA(dataDir, caKey)
	if err != nil {
		return nil, err
	}
	defer closeKeys()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	cert, err := a.IssueServer(hosts, key.Public(), ca.ServerLifetime)
	if err != nil {
		return nil, err
	}
	l := Layout{Dir: dataDir}
	if err := replaceKeyAndCert(l.ServerKey(), l.ServerCert(), key, append(ca.CertPEM(cert), ca.CertPEM(a.Issuing())...)); err != nil {
		return nil, err
	}
	return cert, nil
}

// RenewOperatorCert issues the data directory's operator a new certificate
// (new key, same name) for another ca.OperatorLifetime and records it in
// the registry, which must not be open elsewhere (stop the server first).
// caKey is as for RenewServerCert.
func RenewOperatorCert(dataDir, caKey string) (*x509.Certificate, error) {
	l := Layout{Dir: dataDir}
	a, closeKeys, err := loadSigningCA(dataDir, caKey)
	if err != nil {
		return nil, err
	}
	defer closeKeys()
	old, err := ca.ReadCertFile(l.OperatorCert())
	if err != nil {
		return nil, err
	}
	id, err := identity.FromCertificate(old, a.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("operator certificate: %w", err)
	}
	reg, err := registry.Open(l.RegistryDir(), registry.Options{})
	if err != nil {
		return nil, fmt.Errorf("registry (is the server running? stop it to renew the operator certificate): %w", err)
	}
	defer reg.Close()
	// A removed operator (its certificates revoked) gets none again.
	rec, err := reg.Certificate(ca.SerialString(old.SerialNumber))
	if err != nil && !errors.Is(err, registry.ErrNotFound) {
		return nil, err
	}
	if err == nil && rec.Revoked {
		return nil, fmt.Errorf("operator certificate %s is revoked (operator %s removed?): not renewed", rec.Serial, id.Name)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	op, err := a.Issue(id, key.Public(), ca.OperatorLifetime)
	if err != nil {
		return nil, err
	}
	if err := reg.RecordCertificate(&fleet.Certificate{Serial: ca.SerialString(op.SerialNumber),
		Role: identity.RoleOperator, Name: id.Name, NotBefore: op.NotBefore, NotAfter: op.NotAfter, DER: op.Raw}); err != nil {
		return nil, err
	}
	reg.Audit(registry.AuditRecord{Actor: "server-cert", Action: "operator_renew", Outcome: registry.OutcomeOK, Reason: "serial " + ca.SerialString(op.SerialNumber)})
	if err := replaceKeyAndCert(filepath.Join(dataDir, ca.OperatorKeyFile), l.OperatorCert(), key, append(ca.CertPEM(op), ca.CertPEM(a.Issuing())...)); err != nil {
		return nil, err
	}
	return op, nil
}

// replaceKeyAndCert writes key (0600) and cert, each through a temporary
// file renamed into place; the certificate last, so a crash in between
// leaves a key without its certificate, never a certificate without key.
func replaceKeyAndCert(keyPath, certPath string, key *ecdsa.PrivateKey, certPEM []byte) error {
	kp, err := ca.KeyPEM(key)
	if err != nil {
		return err
	}
	// the old pair is kept beside, for a server that still runs on it
	for _, p := range []string{keyPath, certPath} {
		if b, err := os.ReadFile(p); err == nil {
			if err := ca.WriteFileAtomic(p+".old", b, 0o600); err != nil {
				return err
			}
		}
	}
	if err := ca.WriteFileAtomic(keyPath, kp, 0o600); err != nil {
		return err
	}
	return ca.WriteFileAtomic(certPath, certPEM, 0o644)
}

// ownCerts are the certificates of the gateway itself, by metric label.
func (l Layout) ownCerts() map[string]string {
	return map[string]string{"server": l.ServerCert(), "operator": l.OperatorCert()}
}

// registerOwnCertMetrics exports, per own certificate (read from its file
// at each scrape, so a renewal shows without restart),
// fleetgate_own_certificate_expiry_timestamp_seconds{cert} and
// fleetgate_own_certificate_expiring{cert} (1 within ExpiryWarning).
func registerOwnCertMetrics(reg prometheus.Registerer, l Layout) {
	for label, path := range l.ownCerts() {
		notAfter := func() (time.Time, bool) {
			c, err := ca.ReadCertFile(path)
			if err != nil {
				return time.Time{}, false
			}
			return c.NotAfter, true
		}
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fleetgate_own_certificate_expiry_timestamp_seconds", Help: "NotAfter of the gateway's own server and operator certificates (renew: fleetgate server-cert renew).",
			ConstLabels: prometheus.Labels{"cert": label},
		}, func() float64 {
			t, ok := notAfter()
			if !ok {
				return 0
			}
			return float64(t.Unix())
		}))
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fleetgate_own_certificate_expiring", Help: "1 when the gateway's own certificate expires within 30 days.",
			ConstLabels: prometheus.Labels{"cert": label},
		}, func() float64 {
			t, ok := notAfter()
			if ok && time.Until(t) < ExpiryWarning {
				return 1
			}
			return 0
		}))
	}
}

// ExpiringOwnCerts returns a warning per own certificate of l that expires
// within ExpiryWarning of now (or is unreadable).
func ExpiringOwnCerts(dataDir string, now time.Time) []string {
	var out []string
	for _, label := range []string{"server", "operator"} {
		path := Layout{Dir: dataDir}.ownCerts()[label]
		c, err := ca.ReadCertFile(path)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("%s certificate %s: %v", label, path, err))
		case c.NotAfter.Sub(now) < ExpiryWarning:
			out = append(out, fmt.Sprintf("%s certificate %s expires %s (in %s): renew it with `fleetgate server-cert renew`",
				label, path, c.NotAfter.UTC().Format(time.RFC3339), c.NotAfter.Sub(now).Round(time.Hour)))
		}
	}
	return out
}

// watchOwnCerts logs a warning at start and then daily while an own
// certificate expires within ExpiryWarning.
func (s *Server) watchOwnCerts(ctx context.Context, wg *sync.WaitGroup) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			for _, w := range ExpiringOwnCerts(s.cfg.DataDir, time.Now()) {
				s.log.Warn(w)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(24 * time.Hour):
			}
		}
	}()
}
