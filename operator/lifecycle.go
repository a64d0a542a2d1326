package operator

import (
	"math/big"
	"net/http"
	"strings"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Revoke, suspend and resume devices; revoke single certificates.

func (s *Server) handleDeviceAction(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id, action := r.PathValue("id"), r.PathValue("action")
	if err := identity.ValidateName(id); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	var req api.StateChangeRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(r, &req); err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), id)
			return
		}
	}
	resp := api.StateChangeResponse{DeviceID: id}
	var err error
	switch action {
	case "revoke":
		if req.Reason == "" {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a reason", nil), id)
			return
		}
		resp.RevokedSerials, err = s.cfg.Registry.RevokeDevice(id, req.Reason, op.String())
		if err == nil {
			s.enroll.RefreshCRL()
		}
	case "suspend":
		err = s.cfg.Registry.SetSuspended(id, true, req.Reason, op.String())
	case "resume":
		err = s.cfg.Registry.SetSuspended(id, false, req.Reason, op.String())
	default:
		s.enroll.WriteError(w, r, apiErr(http.StatusNotFound, "unknown_action", "action must be revoke, suspend or resume", nil), id)
		return
	}
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), id)
		return
	}
	if st, ok := s.cfg.Registry.DeviceStatus(id); ok {
		resp.State = string(st.State)
	}
	// Registry watchers (the in-process broker) ran before the registry
	// call returned: sessions are closed by now.
	resp.SessionsClosed = s.cfg.Broker != nil && !s.cfg.Broker.Connected(id)
	s.log.Info("device "+action, logKeyDevice, id, "reason", logguard.Bound(req.Reason, maxLoggedCause), logKeyActor, op.String(), "revoked_serials", len(resp.RevokedSerials))
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) handleCertRevoke(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	serial := strings.ToLower(r.PathValue("serial"))
	if _, ok := new(big.Int).SetString(serial, 16); !ok {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_serial", "serial must be hexadecimal", nil), "")
		return
	}
	var req api.StateChangeRequest
	if err := decodeJSON(r, &req); err != nil || req.Reason == "" {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a JSON body with a reason", err), "")
		return
	}
	if err := s.cfg.Registry.RevokeCertificate(serial, req.Reason, op.String()); err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), "")
		return
	}
	s.enroll.RefreshCRL()
	writeJSON(w, http.StatusOK, api.StateChangeResponse{RevokedSerials: []string{serial}, SessionsClosed: true})
}
