package server

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/enroll/ocsp"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// pkiParts are the PKI services of a process: the CA key's store, the
// OCSP responder (not in a broker-only process: it answers from the
// registry's directory), the staple of the server certificate and the
// plain-HTTP OCSP listener (ocsp_addr).
type pkiParts struct {
	key     keystore.Key
	ln      net.Listener // ocsp_addr, bound before the CA loads (its URL goes in the AIA)
	ocsp    *ocsp.Responder
	stapler *stapler
	http    *httpPart
}

func (p *pkiParts) close() {
	if p.ln != nil && p.http == nil {
		p.ln.Close()
	}
	if p.key != nil {
		p.key.Close()
		p.key = nil
	}
}

// ocspIssuers are the issuing CAs the responder answers for: every
// trusted one, read on each request, so a rotation or a retirement shows at
// once (a CA without a key in this process is left out).
func ocspIssuers(p pki) func() []ocsp.Issuer {
	return func() []ocsp.Issuer {
		var out []ocsp.Issuer
		for _, i := range p.ca.Trusted() {
			if s := i.Signer(); s != nil {
				out = append(out, ocsp.Issuer{Cert: i.Cert, Signer: s})
			}
		}
		return out
	}
}

// listenOCSP binds ocsp_addr (not in a broker-only process).
func (s *Server) listenOCSP() error {
	if s.cfg.OCSPAddr == "" || s.cfg.Only == OnlyBroker {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.OCSPAddr)
	if err != nil {
		return fmt.Errorf("OCSP listen %s: %w", s.cfg.OCSPAddr, err)
	}
	s.pki.ln, s.addrs.OCSP = ln, ln.Addr().String()
	return nil
}

// buildOCSP builds the responder, its metrics and its listener.
func (s *Server) buildOCSP(p pki, dir *directory.Directory) error {
	// self is the server certificate in force: re-issued by a rotation.
	self := func() *x509.Certificate {
		if c := s.caFollow.cert.Load(); c != nil {
			if c.Leaf != nil {
				return c.Leaf
			}
			if len(c.Certificate) > 0 {
				l, _ := x509.ParseCertificate(c.Certificate[0])
				return l
			}
		}
		return nil
	}
	var responses *prometheus.CounterVec
	if s.reg != nil {
		responses = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "fleetgate_ocsp_responses_total",
			Help: "OCSP responses by status (good, revoked, unknown, malformed, unauthorized, internal)."}, []string{"status"})
		for _, st := range []string{"good", "revoked", "unknown", "malformed", "unauthorized", "internal"} {
			responses.WithLabelValues(st)
		}
		r, err := ocsp.New(ocsp.Config{
			Issuers: ocspIssuers(p),
			Source:  &dirSource{dir: dir, reg: s.reg, self: self},
			Logger:  s.log.With("component", "ocsp"),
			Count:   func(st string) { responses.WithLabelValues(st).Inc() },
		})
		if err != nil {
			return err
		}
		if _, err := r.Signers(); err != nil {
			return err // the CA key cannot sign: say so now
		}
		s.pki.ocsp = r
		s.prom.MustRegister(responses)
		s.pki.stapler = &stapler{r: r, current: s.caFollow.cert.Load, log: s.log}
	}
	s.prom.MustRegister(&pkiCollector{s: s, p: p, self: self})
	if s.pki.ln == nil || s.pki.ocsp == nil {
		return nil
	}
	mux := http.NewServeMux()
	mux.Handle("/ocsp", s.pki.ocsp)
	mux.Handle("/ocsp/", s.pki.ocsp)
	s.pki.http = &httpPart{ln: s.pki.ln, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second, MaxHeaderBytes: 8 << 10}}
	s.log.Info("OCSP responder listening", "addr", s.addrs.OCSP)
	return nil
}

// withOCSP serves the responder at /ocsp on the enrollment API too.
func (s *Server) withOCSP(h http.Handler) http.Handler {
	if s.pki.ocsp == nil {
		return h
	}
	mux := http.NewServeMux()
	mux.Handle("/ocsp", s.pki.ocsp)
	mux.Handle("/ocsp/", s.pki.ocsp)
	mux.Handle("/", h)
	return mux
}

// withStaple makes c serve the server certificate with a current OCSP
// staple.
func (s *Server) withStaple(c *tls.Config) *tls.Config {
	if s.pki.stapler == nil {
		return c
	}
	c.Certificates = nil
	c.GetCertificate = s.pki.stapler.get
	return c
}

// stapler keeps an OCSP response for the server certificate in force (a
// rotation re-issues it), renewed at half its validity or when the
// certificate changes.
type stapler struct {
	r       *ocsp.Responder
	current func() *tls.Certificate
	log     *slog.Logger

	mu     sync.Mutex
	base   *tls.Certificate // the certificate cur staples
	cur    *tls.Certificate
	at     time.Time
	warned bool
}

func (st *stapler) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	base := st.current()
	if base == nil || len(base.Certificate) == 0 {
		return nil, errors.New("no server certificate")
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cur != nil && st.base == base && time.Since(st.at) < ocsp.DefaultValidity/2 {
		return st.cur, nil
	}
	c := *base
	leaf := c.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return base, nil
		}
	}
	resp, err := st.r.Staple(leaf)
	if err != nil {
		if !st.warned {
			st.log.Warn("no OCSP staple for the server certificate", "err", err)
			st.warned = true
		}
		return &c, nil
	}
	c.OCSPStaple = resp
	st.base, st.cur, st.at = base, &c, time.Now()
	return st.cur, nil
}

// dirSource answers OCSP from the directory: what the broker would decide
// now. The registry gives the issuer and the revocation time.
type dirSource struct {
	dir  *directory.Directory
	reg  *registry.Registry
	self func() *x509.Certificate // the server's own certificate in force (not in the registry)
}

func (d *dirSource) Status(issuer *x509.Certificate, serial *big.Int) ocsp.Status {
	if self := d.self(); self != nil && self.SerialNumber.Cmp(serial) == 0 && bytes.Equal(self.RawIssuer, issuer.RawSubject) {
		return ocsp.Status{Status: ocsp.Good}
	}
	sn := fleet.SerialString(serial)
	st, ok := d.dir.CertStatus(sn)
	if !ok {
		return ocsp.Status{Status: ocsp.Unknown}
	}
	rec, err := d.reg.Certificate(sn)
	if err != nil {
		return ocsp.Status{Status: ocsp.Unknown}
	}
	cert, err := x509.ParseCertificate(rec.DER)
	if err != nil || !bytes.Equal(cert.RawIssuer, issuer.RawSubject) ||
		(len(cert.AuthorityKeyId) > 0 && !bytes.Equal(cert.AuthorityKeyId, issuer.SubjectKeyId)) {
		return ocsp.Status{Status: ocsp.Unknown} // another CA's serial
	}
	if st.Revoked {
		return ocsp.Status{Status: ocsp.Revoked, RevokedAt: orNow(rec.RevokedAt), Reason: ca.ReasonCodeOf(rec.RevokeReason)} // as the CRL
	}
	if st.Identity.Role == identity.RoleDevice {
		ds, ok := d.dir.DeviceStatus(st.Identity.Name)
		switch {
		case !ok:
			return ocsp.Status{Status: ocsp.Unknown}
		case ds.State == fleet.StateRevoked:
			return ocsp.Status{Status: ocsp.Revoked, RevokedAt: orNow(d.deviceUpdated(st.Identity.Name)), Reason: ocsp.ReasonUnspecified}
		case ds.State == fleet.StateSuspended:
			// Suspension is reversible: certificateHold.
			return ocsp.Status{Status: ocsp.Revoked, RevokedAt: orNow(d.deviceUpdated(st.Identity.Name)), Reason: ocsp.ReasonCertificateHold}
		}
	}
	return ocsp.Status{Status: ocsp.Good}
}

func (d *dirSource) deviceUpdated(id string) time.Time {
	if dev, err := d.reg.Device(id); err == nil {
		return dev.UpdatedAt
	}
	return time.Time{}
}

func orNow(t time.Time) time.Time {
	if t.IsZero() {
		return time.Now()
	}
	return t
}

// pkiCollector exports the expiry of the PKI: CA certificates, OCSP
// signers, the server certificate and the CRL's next update.
type pkiCollector struct {
	s    *Server
	p    pki
	self func() *x509.Certificate
}

var (
	descCertExpiry = prometheus.NewDesc("fleetgate_pki_certificate_expiry_timestamp_seconds",
		"NotAfter of a PKI certificate, by kind (root, issuing, ocsp_signer, server) and subject.", []string{"kind", "subject"}, nil)
	descCRLNext = prometheus.NewDesc("fleetgate_pki_crl_next_update_timestamp_seconds",
		"nextUpdate of the CRL the server serves now.", nil, nil)
)

func (c *pkiCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descCertExpiry
	ch <- descCRLNext
}

func (c *pkiCollector) Collect(ch chan<- prometheus.Metric) {
	expiry := func(kind string, cert *x509.Certificate) {
		ch <- prometheus.MustNewConstMetric(descCertExpiry, prometheus.GaugeValue, float64(cert.NotAfter.Unix()), kind, cert.Subject.CommonName)
	}
	expiry("root", c.p.ca.Root)
	seen := map[string]bool{}
	for _, cert := range c.s.caFollow.trusted() { // every trusted issuing CA, one series per subject
		if !seen[cert.Subject.CommonName] {
			seen[cert.Subject.CommonName] = true
			expiry("issuing", cert)
		}
	}
	if c.s.pki.ocsp != nil {
		// Signers renews a signer that is due: the metric never shows
		// one that is about to lapse only for want of a request.
		if certs, err := c.s.pki.ocsp.Signers(); err == nil {
			for _, sc := range certs {
				expiry("ocsp_signer", sc)
			}
		}
	}
	if self := c.self(); self != nil {
		expiry("server", self)
	}
	if c.s.enroll != nil {
		// The CRL as a client gets it (refreshed when half its life is gone).
		rec := httptest.NewRecorder()
		c.s.enroll.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, api.PathCRL, nil))
		if rec.Code == http.StatusOK {
			if crl, err := x509.ParseRevocationList(rec.Body.Bytes()); err == nil {
				ch <- prometheus.MustNewConstMetric(descCRLNext, prometheus.GaugeValue, float64(crl.NextUpdate.Unix()))
			}
		}
	}
}
