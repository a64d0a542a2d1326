package operator

import (
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

// DeviceAction revokes, suspends or resumes a device for operator op: the
// device action of POST /v1/admin/devices/{id}/{action} (deviceAction),
// with the reason code inferred from the reason, the CRL refreshed after a
// revocation, audited with the operator's name. Its errors are
// *enroll.Error (Status, Code, Msg).
func (s *Server) DeviceAction(op identity.Identity, id, action, reason string) (api.StateChangeResponse, error) {
	resp, err := s.deviceAction(id, action, api.StateChangeRequest{Reason: reason}, op)
	if err != nil {
		return resp, toAPIError(err, "device", id)
	}
	return resp, nil
}
