package enroll

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
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
		Roots:         s.clientCAs,
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

// admin wraps a handler that only operators may call.
func (s *Server) admin(h func(http.ResponseWriter, *http.Request, identity.Identity)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := s.Authenticate(r)
		if err == nil && id.Role != identity.RoleOperator {
			err = apiErr(http.StatusForbidden, "operator_required", "the admin API is for operator certificates only", errNotOperator)
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

func (s *Server) handleServiceIssue(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.ServiceIssueRequest
	if err := decodeJSON(r, &req); err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	id, err := identity.New(identity.RoleService, req.Name)
	if err != nil {
		s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_name", err.Error(), err), "")
		return
	}
	// Service names and device IDs are both MQTT client IDs: one namespace.
	if _, taken := s.cfg.Registry.DeviceStatus(id.Name); taken {
		s.writeError(w, r, apiErr(http.StatusConflict, "name_taken", fmt.Sprintf("%q is a device ID; service names and device IDs share the MQTT client ID namespace", id.Name), nil), "")
		return
	}
	if role, taken := s.cfg.Registry.PrincipalRole(id.Name); taken && role != identity.RoleService {
		s.writeError(w, r, apiErr(http.StatusConflict, "name_taken", fmt.Sprintf("%q is an %s's name", id.Name, role), nil), "")
		return
	}
	resp := api.ServiceIssueResponse{Identity: id.URI(s.cfg.CA.TrustDomain).String(), CACertificatesPEM: s.cfg.CA.RootPEM()}
	var pub any
	if len(req.CSR) > 0 {
		csr, err := ca.CheckCSR(req.CSR)
		if err != nil {
			s.writeError(w, r, asAPIError(csrError(err)), "")
			return
		}
		pub = csr.PublicKey
	} else {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			s.writeError(w, r, asAPIError(err), "")
			return
		}
		kp, err := ca.KeyPEM(k)
		if err != nil {
			s.writeError(w, r, asAPIError(err), "")
			return
		}
		pub = k.Public()
		resp.PrivateKeyPEM = string(kp)
	}
	ttl := req.TTL
	if ttl <= 0 || ttl > s.cfg.ServiceCertTTL {
		ttl = s.cfg.ServiceCertTTL
	}
	cert, err := s.cfg.CA.Issue(id, pub, ttl)
	if err != nil {
		s.writeError(w, r, asAPIError(csrError(err)), "")
		return
	}
	rec := certRecord(cert, id)
	if err := s.cfg.Registry.RecordCertificate(rec); err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "service.issue", Outcome: registry.OutcomeOK, Reason: id.String(), Serial: rec.Serial, Remote: r.RemoteAddr})
	s.log.Info("service certificate issued", "service", id.Name, "serial", rec.Serial, logKeyActor, op.String())
	resp.CertificateChainPEM = s.cfg.CA.ChainPEM(cert)
	resp.Serial = rec.Serial
	resp.NotAfter = cert.NotAfter
	writeJSON(w, http.StatusCreated, resp)
}

func (s *Server) toAPIDevice(d fleet.Device) api.Device {
	online := s.cfg.Online != nil && s.cfg.Online(d.ID)
	return api.Device{ID: d.ID, Group: d.Group, State: string(d.State), AttestationMethod: d.AttestationMethod,
		Serial: d.CurrentSerial, NotAfter: d.NotAfter, CreatedAt: d.CreatedAt, Online: online, Tags: d.Tags}
}

func (s *Server) handleDeviceList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	ds, err := s.cfg.Registry.Devices()
	if err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	out := make([]api.Device, 0, len(ds))
	for _, d := range ds {
		out = append(out, s.toAPIDevice(d))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleDeviceShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	id := r.PathValue("id")
	if err := identity.ValidateName(id); err != nil {
		s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	d, err := s.cfg.Registry.Device(id)
	if err != nil {
		s.writeError(w, r, asAPIError(registryError(err)), id)
		return
	}
	writeJSON(w, http.StatusOK, s.toAPIDevice(*d))
}

// handleAudit returns one page of the audit log, newest first: at most
// limit records (api.DefaultAuditLimit, at most api.MaxAuditLimit) older
// than cursor, optionally of one device. It reads about as many records as
// it returns (registry.AuditPage).
func (s *Server) handleAudit(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	q := r.URL.Query()
	dev := q.Get("device")
	if dev != "" {
		if err := identity.ValidateName(dev); err != nil {
			s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
			return
		}
	}
	limit := api.DefaultAuditLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_limit", "limit must be a positive number", err), "")
			return
		}
		limit = min(n, api.MaxAuditLimit)
	}
	recs, next, err := s.cfg.Registry.AuditPage(registry.AuditQuery{DeviceID: dev, Limit: limit, Cursor: q.Get("cursor")})
	if errors.Is(err, registry.ErrAuditCursor) {
		s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_cursor", "cursor must be the next value of a previous page", err), "")
		return
	}
	if err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	out := api.AuditPage{Records: make([]api.AuditRecord, 0, len(recs)), Next: next}
	for _, a := range recs {
		out.Records = append(out.Records, api.AuditRecord(a))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleDeviceUpdate(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id := r.PathValue("id")
	if err := identity.ValidateName(id); err != nil {
		s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	var req api.DeviceUpdateRequest
	if err := decodeJSON(r, &req); err != nil {
		s.writeError(w, r, asAPIError(err), id)
		return
	}
	if req.Group != "" {
		if err := identity.ValidateName(req.Group); err != nil {
			s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err), id)
			return
		}
	}
	for k, v := range req.Tags {
		// Tags are substituted into topic levels: same rules as names.
		if identity.ValidateName(k) != nil || identity.ValidateName(v) != nil {
			s.writeError(w, r, apiErr(http.StatusBadRequest, "invalid_tag", fmt.Sprintf("tag %q=%q: keys and values must be [a-z0-9-]{1,64}", k, v), nil), id)
			return
		}
	}
	d, err := s.cfg.Registry.UpdateAttributes(id, req.Group, req.Tags, op.String())
	if err != nil {
		s.writeError(w, r, asAPIError(registryError(err)), id)
		return
	}
	writeJSON(w, http.StatusOK, s.toAPIDevice(*d))
}

func (s *Server) handlePolicyReload(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	if s.cfg.ReloadPolicy == nil {
		s.writeError(w, r, apiErr(http.StatusNotImplemented, "no_broker", "no broker runs in this process; send SIGHUP to the broker process", nil), "")
		return
	}
	res, err := s.cfg.ReloadPolicy()
	rec := registry.AuditRecord{Actor: op.String(), Action: "policy.reload", Outcome: registry.OutcomeOK,
		Reason: fmt.Sprintf("%s: %d rules (%d compiled) in force", res.File, res.FileRules, res.Rules)}
	if err != nil {
		rec.Outcome, rec.Reason = registry.OutcomeDenied, err.Error()
	}
	s.cfg.Registry.Audit(rec)
	if err != nil {
		s.writeError(w, r, apiErr(http.StatusUnprocessableEntity, "policy_invalid", "policy refused, the previous one stays in force:\n"+err.Error(), err), "")
		return
	}
	writeJSON(w, http.StatusOK, res)
}
