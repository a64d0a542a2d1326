package enroll

import (
	"crypto/x509"
	"errors"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Admin API errors.
var (
	errNoClientCert = errors.New("no verified client certificate")
	errNotOperator  = errors.New("certificate is not an operator's")
)

// Authenticate returns the identity of the verified client certificate of r,
// if the registry knows its serial and it is not revoked or expired.
func (s *Server) Authenticate(r *http.Request) (identity.Identity, error) {
	id, _, err := s.authenticate(r)
	return id, err
}

// authenticate is Authenticate that also returns the verified certificate.
func (s *Server) authenticate(r *http.Request) (identity.Identity, *x509.Certificate, error) {
	leaf, err := s.verifiedClientCert(r)
	if err != nil {
		return identity.Identity{}, nil, err
	}
	id, err := identity.FromCertificate(leaf, s.cfg.CA.TrustDomain)
	if err != nil {
		return identity.Identity{}, nil, apiErr(http.StatusUnauthorized, "client_cert_identity", "client certificate carries no valid identity", err)
	}
	st, ok := s.cfg.Registry.CertStatus(ca.SerialString(leaf.SerialNumber))
	switch {
	case !ok:
		return identity.Identity{}, nil, apiErr(http.StatusUnauthorized, "client_cert_unknown", "client certificate was not issued by this registry", nil)
	case st.Revoked:
		return identity.Identity{}, nil, apiErr(http.StatusUnauthorized, "client_cert_revoked", "client certificate is revoked", nil)
	case st.Identity != id:
		return identity.Identity{}, nil, apiErr(http.StatusUnauthorized, "client_cert_identity", "client certificate identity does not match the registry", nil)
	}
	return id, leaf, nil
}

// verifiedClientCert returns the leaf of r's client certificate chain once
// it verifies as crypto/tls verifies a client certificate
// (tls.VerifyClientCertIfGiven): up to the issuing CA as the only root, the
// other presented certificates as intermediates, for client authentication,
// at the current time. The TLS configuration (TLSConfig) only requests the
// certificate; crypto/tls checked that the client holds its key.
func (s *Server) verifiedClientCert(r *http.Request) (*x509.Certificate, error) {
	if r.TLS == nil {
		return nil, apiErr(http.StatusUnauthorized, "client_cert_required", "a client certificate issued by this fleetgate is required", errNoClientCert)
	}
	if len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		// Verified at the handshake by a configuration that does so.
		return r.TLS.VerifiedChains[0][0], nil
	}
	certs := r.TLS.PeerCertificates
	if len(certs) == 0 {
		return nil, apiErr(http.StatusUnauthorized, "client_cert_required", "a client certificate issued by this fleetgate is required", errNoClientCert)
	}
	opts := x509.VerifyOptions{
		Roots:         s.cfg.CA.ClientCAs(), // the trusted issuing CAs now (they change at a rotation)
		Intermediates: x509.NewCertPool(),
		CurrentTime:   time.Now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, c := range certs[1:] {
		opts.Intermediates.AddCert(c)
	}
	chains, err := certs[0].Verify(opts)
	if err != nil || len(chains) == 0 || len(chains[0]) == 0 {
		return nil, apiErr(http.StatusUnauthorized, "client_cert_invalid", "client certificate does not verify against this fleetgate's CA (unknown issuer, expired or not for client authentication)", err)
	}
	return chains[0][0], nil
}

// admin wraps a handler that only operators may call (the registry
// change feed; the operator API is operator/).
func (s *Server) admin(h func(http.ResponseWriter, *http.Request, identity.Identity)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := s.Authenticate(r)
		if err == nil && id.Role != identity.RoleOperator {
			err = apiErr(http.StatusForbidden, "operator_required", "the admin API is for operator certificates only", errNotOperator)
		}
		if err == nil {
			if role, rerr := s.cfg.Registry.OperatorRole(id.Name); rerr != nil || role == registry.OperatorNone {
				err = apiErr(http.StatusForbidden, "operator_no_role", "operator "+id.Name+" has no role and may do nothing", rerr)
			}
		}
		if err != nil {
			e := asAPIError(err)
			if s.refusal(r, e) {
				s.cfg.Registry.AuditBatched(registry.AuditRecord{Actor: id.String(), Action: logguard.Bound("admin "+r.Method+" "+r.URL.Path, maxLoggedField), Outcome: registry.OutcomeDenied, Reason: e.Code, Remote: r.RemoteAddr})
			}
			s.writeError(w, r, e, "")
			return
		}
		h(w, r, id)
	}
}
