package operator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Services and operators: names with certificates (no device record).
// Services: list, show, renew, revoke. Operators: list, add (with a role),
// remove (never the last admin).

// principalState is active while a certificate is valid, else revoked (all
// revoked) or expired.
func principalState(cs []fleet.Certificate, now time.Time) (string, time.Time) {
	state, last := "expired", time.Time{}
	revoked := len(cs) > 0
	for _, c := range cs {
		if !c.Revoked {
			revoked = false
		}
		if !c.Revoked && now.Before(c.NotAfter) {
			state = "active"
			if c.NotAfter.After(last) {
				last = c.NotAfter
			}
		}
	}
	if state != "active" && revoked {
		state = "revoked"
	}
	return state, last
}

func toAPICerts(cs []fleet.Certificate) []api.Certificate {
	out := make([]api.Certificate, 0, len(cs))
	for _, c := range cs {
		out = append(out, api.Certificate{Serial: c.Serial, NotBefore: c.NotBefore, NotAfter: c.NotAfter, IssuedAt: c.IssuedAt,
			Revoked: c.Revoked, RevokedAt: c.RevokedAt, RevokeReason: c.RevokeReason})
	}
	return out
}

func (s *Server) toAPIService(name string, cs []fleet.Certificate, withCerts bool) api.Service {
	st, na := principalState(cs, s.cfg.CA.Now())
	svc := api.Service{Name: name, Identity: identity.Identity{Role: identity.RoleService, Name: name}.URI(s.cfg.CA.TrustDomain).String(),
		State: st, NotAfter: na}
	if s.cfg.Broker != nil {
		svc.Online = s.cfg.Broker.Online(name)
	}
	if withCerts {
		svc.Certificates = toAPICerts(cs)
	}
	return svc
}

// pathName reads and checks the {name} of a path.
func (s *Server) pathName(w http.ResponseWriter, r *http.Request, key string) (string, bool) {
	name := r.PathValue(key)
	if err := identity.ValidateName(name); err != nil {
		s.badRequest(w, r, "invalid_name", err.Error(), err)
		return "", false
	}
	return name, true
}

func (s *Server) handleServiceList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	listPrincipals(s, w, r, identity.RoleService,
		func(name string, cs []fleet.Certificate) (api.Service, error) {
			return s.toAPIService(name, cs, false), nil
		},
		func(v api.Service) (string, string) { return v.Name, v.State })
}

// listPrincipals writes a page of the principals of role (services,
// operators) as conv makes them, sorted by name and filtered by ?state=
// (nameState gives both of an item).
func listPrincipals[T any](s *Server, w http.ResponseWriter, r *http.Request, role identity.Role,
	conv func(string, []fleet.Certificate) (T, error), nameState func(T) (string, string)) {
	p, err := readPage(r)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	state := r.URL.Query().Get("state")
	all, err := s.cfg.Registry.Principals(role)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	out := []T{}
	for name, cs := range all {
		v, err := conv(name, cs)
		if err != nil {
			s.fail(w, r, err, "", "")
			return
		}
		if _, st := nameState(v); state == "" || st == state {
			out = append(out, v)
		}
	}
	nameOf := func(v T) string { n, _ := nameState(v); return n }
	sort.Slice(out, func(i, j int) bool { return nameOf(out[i]) < nameOf(out[j]) })
	writeJSON(w, http.StatusOK, cut(p, out, nameOf))
}

// serviceCerts returns the certificates of service name, or writes 404
// (none) or the error.
func (s *Server) serviceCerts(w http.ResponseWriter, r *http.Request, name string) ([]fleet.Certificate, bool) {
	cs, err := s.cfg.Registry.PrincipalCertificates(identity.RoleService, name)
	if err == nil && len(cs) == 0 {
		err = registry.ErrNotFound
	}
	if err != nil {
		s.fail(w, r, err, "service", name)
		return nil, false
	}
	return cs, true
}

func (s *Server) handleServiceShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	name, ok := s.pathName(w, r, "name")
	if !ok {
		return
	}
	if cs, ok := s.serviceCerts(w, r, name); ok {
		writeJSON(w, http.StatusOK, s.toAPIService(name, cs, true))
	}
}

func (s *Server) handleServiceRenew(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	name, ok := s.pathName(w, r, "name")
	if !ok {
		return
	}
	var req api.ServiceRenewRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(r, &req); err != nil {
			s.fail(w, r, err, "", "")
			return
		}
	}
	if _, ok := s.serviceCerts(w, r, name); !ok {
		return
	}
	s.issuePrincipal(w, r, op, identity.Identity{Role: identity.RoleService, Name: name}, req.CSR, req.TTL, "service.renew")
}

func (s *Server) handleServiceRevoke(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	s.revokePrincipal(w, r, op, identity.RoleService)
}

// revokePrincipal revokes every valid certificate of the path's {name}
// (services: their live connections are closed as the registry tells the
// broker).
func (s *Server) revokePrincipal(w http.ResponseWriter, r *http.Request, op identity.Identity, role identity.Role) {
	name, ok := s.pathName(w, r, "name")
	if !ok {
		return
	}
	var req api.StateChangeRequest
	if err := decodeJSON(r, &req); err != nil || req.Reason == "" {
		s.badRequest(w, r, "reason_required", "revocation needs a JSON body with a reason", err)
		return
	}
	reason, err := revocationReason(req)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	before := 0
	if s.cfg.Broker != nil {
		before = s.cfg.Broker.Online(name)
	}
	var serials []string
	if role == identity.RoleOperator {
		serials, err = s.cfg.Registry.RemoveOperator(name, reason, op.String())
	} else {
		serials, err = s.cfg.Registry.RevokePrincipal(role, name, reason, op.String())
	}
	if errors.Is(err, registry.ErrLastAdmin) {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, "last_admin", fmt.Sprintf("operator %s is the last admin; add another admin first", name), err), "")
		return
	}
	if err != nil {
		s.fail(w, r, err, string(role), name)
		return
	}
	if len(serials) > 0 {
		s.enroll.RefreshCRL()
	}
	resp := api.RemoveResponse{Name: name, RevokedSerials: serials}
	if serials == nil {
		resp.RevokedSerials = []string{}
	}
	if s.cfg.Broker != nil {
		resp.SessionsClosed = max(0, before-s.cfg.Broker.Online(name))
	}
	s.log.Info(string(role)+" revoked", string(role), name, "reason", logguard.Bound(req.Reason, maxLoggedCause), logKeyActor, op.String(), "revoked_serials", len(serials))
	writeJSON(w, http.StatusOK, resp)
}

// issuePrincipal issues a certificate for a service or operator id, for
// the CSR's key, else for a key it generates and returns (once).
func (s *Server) issuePrincipal(w http.ResponseWriter, r *http.Request, op, id identity.Identity, csrDER []byte, ttl time.Duration, action string) {
	resp := api.ServiceIssueResponse{Identity: id.URI(s.cfg.CA.TrustDomain).String(), CACertificatesPEM: s.cfg.CA.RootPEM()}
	var pub any
	if len(csrDER) > 0 {
		csr, err := ca.CheckCSR(csrDER)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(csrError(err)), "")
			return
		}
		pub = csr.PublicKey
	} else {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			s.fail(w, r, err, "", "")
			return
		}
		kp, err := ca.KeyPEM(k)
		if err != nil {
			s.fail(w, r, err, "", "")
			return
		}
		pub = k.Public()
		resp.PrivateKeyPEM = string(kp)
	}
	max := s.cfg.ServiceCertTTL
	if id.Role == identity.RoleOperator {
		max = ca.OperatorLifetime
	}
	if ttl <= 0 || ttl > max {
		ttl = max
	}
	cert, err := s.cfg.CA.Issue(id, pub, ttl)
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(csrError(err)), "")
		return
	}
	rec := certRecord(cert, id)
	if err := s.cfg.Registry.RecordCertificate(rec); err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: action, Outcome: registry.OutcomeOK, Reason: id.String(), Serial: rec.Serial, Remote: r.RemoteAddr})
	s.log.Info("certificate issued", "identity", id.String(), "serial", rec.Serial, "server_key", len(csrDER) == 0, logKeyActor, op.String())
	resp.CertificateChainPEM = s.cfg.CA.ChainPEM(cert)
	resp.Serial = rec.Serial
	resp.NotAfter = cert.NotAfter
	writeJSON(w, http.StatusCreated, resp)
}

// ---- operators ----

func (s *Server) toAPIOperator(name string, cs []fleet.Certificate, withCerts bool) (api.Operator, error) {
	role, err := s.cfg.Registry.OperatorRole(name)
	if err != nil {
		return api.Operator{}, err
	}
	if role == registry.OperatorNone {
		role = api.OperatorNoRole
	}
	st, na := principalState(cs, s.cfg.CA.Now())
	o := api.Operator{Name: name, Role: role, State: st, NotAfter: na}
	if withCerts {
		o.Certificates = toAPICerts(cs)
	}
	return o, nil
}

func (s *Server) handleOperatorList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	listPrincipals(s, w, r, identity.RoleOperator,
		func(name string, cs []fleet.Certificate) (api.Operator, error) {
			return s.toAPIOperator(name, cs, false)
		},
		func(v api.Operator) (string, string) { return v.Name, v.State })
}

func (s *Server) handleWhoAmI(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	cs, err := s.cfg.Registry.PrincipalCertificates(identity.RoleOperator, op.Name)
	if err == nil {
		var o api.Operator
		if o, err = s.toAPIOperator(op.Name, cs, false); err == nil {
			writeJSON(w, http.StatusOK, o)
			return
		}
	}
	s.fail(w, r, err, "", "")
}

func (s *Server) handleOperatorAdd(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.OperatorAddRequest
	if err := decodeJSON(r, &req); err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	id, err := identity.New(identity.RoleOperator, req.Name)
	if err != nil {
		s.badRequest(w, r, "invalid_name", err.Error(), err)
		return
	}
	if req.Role == "" {
		req.Role = api.OperatorAdmin
	}
	if req.Role != api.OperatorAdmin && req.Role != api.OperatorReadOnly {
		s.badRequest(w, r, "invalid_role", fmt.Sprintf("role %q: must be admin or read-only", req.Role), nil)
		return
	}
	if _, taken := s.cfg.Registry.DeviceStatus(id.Name); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, fleet.ReasonNameTaken, fmt.Sprintf("%q is a device ID", id.Name), nil), "")
		return
	}
	if role, taken := s.cfg.Registry.PrincipalRole(id.Name); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, fleet.ReasonNameTaken, fmt.Sprintf("%q is already an %s's name", id.Name, role), nil), "")
		return
	}
	if err := s.cfg.Registry.SetOperatorRole(registry.OperatorRecord{Name: id.Name, Role: req.Role, CreatedBy: op.String()}); err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "operator.add", Outcome: registry.OutcomeOK, Reason: id.String() + " role " + req.Role, Remote: r.RemoteAddr})
	s.issuePrincipal(w, r, op, id, req.CSR, req.TTL, "operator.issue")
}

func (s *Server) handleOperatorRemove(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	s.revokePrincipal(w, r, op, identity.RoleOperator)
}
