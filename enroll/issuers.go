package enroll

import (
	"crypto/x509"
	"errors"
	"math/big"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/fleet"
)

// The issuing CAs as devices and relying parties see them: which one is
// current (a device on another renews early), and one CRL per trusted
// issuing CA, listing the revoked certificates it issued.

// issuerCRLs caches the CRL of each issuing CA until a revocation or
// until half its validity has passed.
type issuerCRLs struct {
	mu sync.Mutex
	m  map[string]issuerCRL
	// revocations counts the revocations committed (a CRL made before the
	// last one is stale).
	revocations atomic.Uint64
}

type issuerCRL struct {
	der     []byte
	until   time.Time
	version uint64
}

func (s *Server) registerIssuerRoutes() {
	s.issuerCRLs.m = map[string]issuerCRL{}
	s.cfg.Registry.Watch(func(ev fleet.Event) {
		if ev.Kind == fleet.EventCertRevoked {
			s.issuerCRLs.revocations.Add(1)
		}
	})
	s.mux.HandleFunc("GET "+api.PathCAIssuers, s.handleCAIssuers)
	s.mux.HandleFunc("GET "+api.PathCRLIssuer+"{id}", s.handleIssuerCRL)
}

func (s *Server) handleCAIssuers(w http.ResponseWriter, _ *http.Request) {
	resp := api.CAIssuersResponse{Current: s.cfg.CA.Current().ID}
	for _, i := range s.cfg.CA.Trusted() {
		resp.Trusted = append(resp.Trusted, api.CAIssuerPublic{ID: i.ID, CertificatePEM: string(ca.CertPEM(i.Cert)), CRL: api.PathCRLIssuer + i.ID})
	}
	w.Header().Set("Cache-Control", "no-cache")
	WriteJSON(w, http.StatusOK, resp)
}

func (s *Server) handleIssuerCRL(w http.ResponseWriter, r *http.Request) {
	der, err := s.IssuerCRL(r.PathValue("id"))
	if errors.Is(err, ca.ErrUnknownIssuer) {
		s.writeError(w, r, apiErr(http.StatusNotFound, fleet.ReasonNotFound, "no trusted issuing CA with this ID", err), "")
		return
	}
	if err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	w.Header().Set("Content-Type", api.ContentTypeCRL)
	w.Header().Set("Cache-Control", "no-cache")
	w.Write(der)
}

// IssuerCRL returns the CRL (DER) of the trusted issuing CA id: the
// revoked, unexpired certificates it issued, signed with its key.
func (s *Server) IssuerCRL(id string) ([]byte, error) {
	c := &s.issuerCRLs
	c.mu.Lock()
	defer c.mu.Unlock()
	iss, ok := s.cfg.CA.Issuer(id)
	if !ok || (iss.State != ca.IssuerCurrent && iss.State != ca.IssuerTrusted) {
		return nil, ca.ErrUnknownIssuer
	}
	now := s.cfg.CA.Now()
	version := c.revocations.Load()
	if e, ok := c.m[id]; ok && e.version == version && now.Before(e.until) {
		return e.der, nil
	}
	var entries []ca.Revoked
	err := s.cfg.Registry.EachCertificate(func(rec *fleet.Certificate) error {
		if !rec.Revoked || !now.Before(rec.NotAfter) {
			return nil
		}
		cert, err := x509.ParseCertificate(rec.DER)
		if err != nil || !ca.SignedBy(cert, iss.Cert) {
			return nil
		}
		n, ok := new(big.Int).SetString(rec.Serial, 16)
		if ok {
			entries = append(entries, ca.Revoked{Serial: n, RevokedAt: rec.RevokedAt})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	num, err := s.cfg.Registry.NextCRLNumber()
	if err != nil {
		return nil, err
	}
	der, err := s.cfg.CA.CRLFor(id, num, entries, s.cfg.CRLValidity)
	if err != nil {
		return nil, err
	}
	c.m[id] = issuerCRL{der: der, until: now.Add(s.cfg.CRLValidity / 2), version: version}
	return der, nil
}
