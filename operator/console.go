package operator

import (
	"fmt"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// What the web console (package console) needs of the operator API: the
// device operations the admin API performs, and the route that mints its
// sign-in links with the operator certificate.

// ConsoleLinks mints one-time sign-in links of the web console for an
// operator, bound to the certificate (serial) that asked.
type ConsoleLinks interface {
	MintLink(op identity.Identity, serial string) (api.ConsoleLoginResponse, error)
}

// RegisterConsole mounts POST api.PathAdminConsoleLogin on m: an operator
// certificate gets a one-time link of the console (audited).
func (s *Server) RegisterConsole(m Mux, links ConsoleLinks) {
	m.HandleFunc("POST "+api.PathAdminConsoleLogin, s.admin(func(w http.ResponseWriter, r *http.Request, op identity.Identity) {
		leaf, err := s.enroll.VerifiedClientCert(r)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), "")
			return
		}
		serial := fleet.SerialString(leaf.SerialNumber)
		res, err := links.MintLink(op, serial)
		rec := registry.AuditRecord{Actor: op.String(), Action: "console.link", Outcome: registry.OutcomeOK, Remote: r.RemoteAddr, Serial: serial}
		if err != nil {
			rec.Outcome, rec.Reason = registry.OutcomeDenied, logguard.Bound(err.Error(), maxLoggedField)
		}
		s.cfg.Registry.Audit(rec)
		if err != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusTooManyRequests, "console_links_full", err.Error(), err), "")
			return
		}
		writeJSON(w, http.StatusOK, res)
	}))
}

// DeviceAction revokes, suspends or resumes a device for operator op, as
// POST /v1/admin/devices/{id}/{action} does: the same registry calls, the
// CRL refreshed after a revocation, audited with the operator's name. Its
// errors are *enroll.Error (Status, Code, Msg).
func (s *Server) DeviceAction(op identity.Identity, id, action, reason string) (api.StateChangeResponse, error) {
	resp := api.StateChangeResponse{DeviceID: id}
	if err := identity.ValidateName(id); err != nil {
		return resp, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err)
	}
	var err error
	switch action {
	case "revoke":
		if reason == "" {
			return resp, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a reason", nil)
		}
		resp.RevokedSerials, err = s.cfg.Registry.RevokeDevice(id, reason, op.String())
		if err == nil {
			s.enroll.RefreshCRL()
		}
	case "suspend":
		err = s.cfg.Registry.SetSuspended(id, true, reason, op.String())
	case "resume":
		err = s.cfg.Registry.SetSuspended(id, false, reason, op.String())
	default:
		return resp, apiErr(http.StatusNotFound, "unknown_action", fmt.Sprintf("action %q: want revoke, suspend or resume", action), nil)
	}
	if err != nil {
		return resp, asAPIError(registryError(err))
	}
	if st, ok := s.cfg.Registry.DeviceStatus(id); ok {
		resp.State = string(st.State)
	}
	resp.SessionsClosed = s.cfg.Broker != nil && !s.cfg.Broker.Connected(id)
	s.log.Info("device "+action, logKeyDevice, id, "reason", logguard.Bound(reason, maxLoggedCause), logKeyActor, op.String(), "via", "console")
	return resp, nil
}
