package operator

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Issuing-CA rotation through the admin API (docs/pki.md): status, rotate
// (or, with the root offline, a new key and its CSR), import of the
// root-signed certificate, retirement. Every call is audited. The CA keeps
// the issuer set; the directory's trusted issuers are updated here; the
// rest of the process (broker, server certificates) follows through
// CAFollower.

// CAFollower makes the process follow a change of the issuing CAs.
type CAFollower interface {
	// CAChanged is called after the set changed; rotated: a new current
	// issuing CA (the server and operator certificates are re-issued).
	CAChanged(rotated bool) (CAFollowed, error)
}

// CAFollowed is what following a change did.
type CAFollowed struct {
	ServerReissued, OperatorReissued bool
	// SessionsClosed counts the MQTT sessions closed because their
	// certificate's issuing CA is no longer trusted.
	SessionsClosed int
}

func (s *Server) registerCA(m Mux) {
	m.HandleFunc("GET "+api.PathAdminCA, s.admin(s.handleCAStatus))
	m.HandleFunc("POST "+api.PathAdminCARotate, s.admin(s.handleCARotate))
	m.HandleFunc("POST "+api.PathAdminCAImport, s.admin(s.handleCAImport))
	m.HandleFunc("POST "+api.PathAdminCARetire, s.admin(s.handleCARetire))
}

// issuerUse counts, per issuing CA ID, the active devices whose current
// certificate it issued, and the services and operators whose newest
// unexpired, unrevoked certificate it issued. A device's earlier
// certificates stay valid after a renewal, but it no longer uses them.
func (s *Server) issuerUse() (devices, principals map[string]int, err error) {
	devices, principals = map[string]int{}, map[string]int{}
	devs, err := s.cfg.Registry.Devices()
	if err != nil {
		return nil, nil, err
	}
	current := map[string]bool{}
	for _, d := range devs {
		if d.State == fleet.StateActive && d.CurrentSerial != "" {
			current[d.CurrentSerial] = true
		}
	}
	type newest struct {
		notBefore time.Time
		issuer    string
	}
	others := map[string]newest{}
	now := time.Now()
	err = s.cfg.Registry.EachCertificate(func(c *fleet.Certificate) error {
		if c.Revoked || !now.Before(c.NotAfter) || (c.Role == identity.RoleDevice && !current[c.Serial]) {
			return nil
		}
		cert, err := x509.ParseCertificate(c.DER)
		if err != nil {
			return nil
		}
		iss := s.cfg.CA.IssuerOf(cert)
		if iss == nil {
			return nil
		}
		if c.Role == identity.RoleDevice {
			devices[iss.ID]++
		} else if o, ok := others[c.Name]; !ok || c.NotBefore.After(o.notBefore) ||
			(c.NotBefore.Equal(o.notBefore) && iss.ID == s.cfg.CA.Current().ID) {
			// Certificates made in the same second (a rotation right
			// after init re-issues the operator's) tie on NotBefore: the
			// current CA's is the newer one.
			others[c.Name] = newest{c.NotBefore, iss.ID}
		}
		return nil
	})
	for _, o := range others {
		principals[o.issuer]++
	}
	return devices, principals, err
}

func issuerView(i *ca.Issuer, devices, principals map[string]int) api.CAIssuer {
	v := api.CAIssuer{ID: i.ID, State: string(i.State), Added: i.Added, Retired: i.Retired,
		ActiveDevices: devices[i.ID], Principals: principals[i.ID], CSRPEM: string(i.CSR)}
	if i.Cert != nil {
		v.Subject, v.NotBefore, v.NotAfter = i.Cert.Subject.String(), i.Cert.NotBefore, i.Cert.NotAfter
		v.CertificatePEM = string(ca.CertPEM(i.Cert))
	}
	return v
}

func (s *Server) handleCAStatus(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	devices, principals, err := s.issuerUse()
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	st := api.CAStatus{Root: s.cfg.CA.Root.Subject.String(), RootKeyOnline: s.cfg.CA.RootKeyAvailable(), Current: s.cfg.CA.Current().ID}
	for _, i := range s.cfg.CA.Issuers() {
		st.Issuers = append(st.Issuers, issuerView(i, devices, principals))
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) caAudit(op identity.Identity, r *http.Request, action, reason string, err error) {
	rec := registry.AuditRecord{Actor: op.String(), Action: action, Outcome: registry.OutcomeOK, Reason: reason, Remote: r.RemoteAddr}
	if err != nil {
		rec.Outcome, rec.Reason = registry.OutcomeDenied, reason+": "+causeText(asAPIError(err))
	}
	s.cfg.Registry.Audit(rec)
}

// follow makes the directory and the process follow a change.
func (s *Server) follow(rotated bool) (CAFollowed, error) {
	s.dir.SetTrustedIssuers(s.cfg.CA.TrustedCerts())
	if s.cfg.CAFollower == nil {
		return CAFollowed{}, nil
	}
	return s.cfg.CAFollower.CAChanged(rotated)
}

func caError(err error) *enroll.Error {
	switch {
	case errors.Is(err, ca.ErrUnknownIssuer):
		return apiErr(http.StatusNotFound, fleet.ReasonNotFound, err.Error(), err)
	case errors.Is(err, ca.ErrIssuerIsCurrent), errors.Is(err, ca.ErrIssuerRetired):
		return apiErr(http.StatusConflict, fleet.ReasonInvalidState, err.Error(), err)
	case errors.Is(err, ca.ErrBadIssuingCert):
		return apiErr(http.StatusBadRequest, fleet.Reason(api.ReasonBadIssuingCA), err.Error(), err)
	}
	return asAPIError(err)
}

func (s *Server) handleCARotate(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	if !s.cfg.CA.RootKeyAvailable() {
		// Offline root: a new key and its CSR; the certificate comes back
		// through import.
		p, err := s.cfg.CA.PrepareIssuing()
		s.caAudit(op, r, "ca.rotate", "issuing CA "+idOf(p)+" pending: CSR for the offline root", err)
		if err != nil {
			s.enroll.WriteError(w, r, caError(err), "")
			return
		}
		s.log.Info("issuing CA pending: its CSR waits for the offline root", "issuer", p.ID, logKeyActor, op.String())
		writeJSON(w, http.StatusAccepted, api.CAChangeResponse{Issuer: issuerView(p, nil, nil)})
		return
	}
	prev := s.cfg.CA.Current().ID
	iss, err := s.cfg.CA.Rotate()
	if err != nil {
		s.caAudit(op, r, "ca.rotate", "rotation from "+prev, err)
		s.enroll.WriteError(w, r, caError(err), "")
		return
	}
	s.changed(w, r, op, "ca.rotate", fmt.Sprintf("issuing CA %s current, %s trusted until retired", iss.ID, prev), iss)
}

func idOf(i *ca.Issuer) string {
	if i == nil {
		return "?"
	}
	return i.ID
}

// changed follows a new current issuing CA and answers.
func (s *Server) changed(w http.ResponseWriter, r *http.Request, op identity.Identity, action, reason string, iss *ca.Issuer) {
	f, err := s.follow(true)
	if err != nil {
		reason += "; following it: " + err.Error()
	}
	s.caAudit(op, r, action, reason, nil)
	s.log.Info("issuing CA rotated", "issuer", iss.ID, "server_reissued", f.ServerReissued, "operator_reissued", f.OperatorReissued, logKeyActor, op.String(), "follow_err", err)
	writeJSON(w, http.StatusOK, api.CAChangeResponse{Issuer: issuerView(iss, nil, nil), ServerReissued: f.ServerReissued, OperatorReissued: f.OperatorReissued})
}

func (s *Server) handleCAImport(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.CAImportRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	iss, err := s.cfg.CA.ImportIssuing([]byte(req.CertificatePEM))
	if err != nil {
		s.caAudit(op, r, "ca.import", "issuing CA certificate", err)
		s.enroll.WriteError(w, r, caError(err), "")
		return
	}
	s.changed(w, r, op, "ca.import", "issuing CA "+iss.ID+" imported and current", iss)
}

func (s *Server) handleCARetire(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.CARetireRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	iss, ok := s.cfg.CA.Issuer(req.ID)
	if !ok {
		err := fmt.Errorf("%w: %s", ca.ErrUnknownIssuer, req.ID)
		s.caAudit(op, r, "ca.retire", req.ID, err)
		s.enroll.WriteError(w, r, caError(err), "")
		return
	}
	devices, principals, err := s.issuerUse()
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	if n := devices[req.ID]; n > 0 && !req.Force && iss.State != ca.IssuerCurrent {
		err := apiErr(http.StatusConflict, fleet.Reason(api.ReasonCAInUse),
			fmt.Sprintf("%d active devices still hold certificates of issuing CA %s; wait for them to renew (see `fleetgate ca status`) or retire with --force", n, req.ID), nil)
		s.caAudit(op, r, "ca.retire", req.ID, err)
		s.enroll.WriteError(w, r, err, "")
		return
	}
	done, err := s.cfg.CA.Retire(req.ID)
	if err != nil {
		s.caAudit(op, r, "ca.retire", req.ID, err)
		s.enroll.WriteError(w, r, caError(err), "")
		return
	}
	f, ferr := s.follow(false)
	reason := fmt.Sprintf("issuing CA %s retired (force %t, %d active devices and %d other principals still held its certificates, %d sessions closed)",
		req.ID, req.Force, devices[req.ID], principals[req.ID], f.SessionsClosed)
	if ferr != nil {
		reason += "; following it: " + ferr.Error()
	}
	s.caAudit(op, r, "ca.retire", reason, nil)
	s.log.Info("issuing CA retired", "issuer", req.ID, "force", req.Force, "devices", devices[req.ID], "sessions_closed", f.SessionsClosed, logKeyActor, op.String())
	writeJSON(w, http.StatusOK, api.CARetireResponse{Issuer: issuerView(done, devices, principals), SessionsClosed: f.SessionsClosed})
}
