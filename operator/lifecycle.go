package operator

import (
	"fmt"
	"math/big"
	"net/http"
	"sort"
	"strings"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Revoke, suspend and resume devices and whole groups; revoke single
// certificates.

// revocationReason is the reason stored for a revocation:
// "<CRL reason code name>: <text>" when the code is given or the text
// implies one (ca.ReasonCodeOf reads it back for the CRL).
func revocationReason(req api.StateChangeRequest) (string, error) {
	code := req.ReasonCode
	if code == "" {
		code = ca.InferReasonCode(req.Reason)
	}
	if code == "" {
		return req.Reason, nil
	}
	if _, ok := ca.ReasonCodes[code]; !ok {
		names := make([]string, 0, len(ca.ReasonCodes))
		for n := range ca.ReasonCodes {
			names = append(names, n)
		}
		sort.Strings(names)
		return "", apiErr(http.StatusBadRequest, "invalid_reason_code", fmt.Sprintf("reason code %q: one of %s", code, strings.Join(names, ", ")), nil)
	}
	if _, _, has := strings.Cut(req.Reason, ":"); has && ca.ReasonCodeOf(req.Reason) != 0 {
		return req.Reason, nil // already carries one
	}
	return code + ": " + req.Reason, nil
}

// deviceAction revokes, suspends or resumes device id and reports whether
// a live session was there and was closed.
func (s *Server) deviceAction(id, action string, req api.StateChangeRequest, op identity.Identity) (api.StateChangeResponse, error) {
	if err := identity.ValidateName(id); err != nil {
		return api.StateChangeResponse{DeviceID: id}, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err)
	}
	resp := api.StateChangeResponse{DeviceID: id, WasOnline: s.online(id)}
	var err error
	switch action {
	case "revoke":
		if req.Reason == "" {
			return resp, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a reason", nil)
		}
		reason, rerr := revocationReason(req)
		if rerr != nil {
			return resp, rerr
		}
		resp.RevokedSerials, err = s.cfg.Registry.RevokeDevice(id, reason, op.String())
		if err == nil {
			s.enroll.RefreshCRL()
		}
	case "suspend":
		err = s.cfg.Registry.SetSuspended(id, true, req.Reason, op.String())
	case "resume":
		err = s.cfg.Registry.SetSuspended(id, false, req.Reason, op.String())
	default:
		return resp, apiErr(http.StatusNotFound, "unknown_action", fmt.Sprintf("action %q: must be revoke, suspend or resume", logguard.Bound(action, 32)), nil)
	}
	if err != nil {
		return resp, err
	}
	if st, ok := s.cfg.Registry.DeviceStatus(id); ok {
		resp.State = string(st.State)
	}
	// Registry watchers (the in-process broker) ran before the registry
	// call returned: sessions are closed by now.
	resp.SessionsClosed = resp.WasOnline && !s.online(id)
	s.log.Info("device "+action, logKeyDevice, id, "reason", logguard.Bound(req.Reason, maxLoggedCause), logKeyActor, op.String(),
		"revoked_serials", len(resp.RevokedSerials), "session_closed", resp.SessionsClosed)
	return resp, nil
}

func (s *Server) handleDeviceAction(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id, action := r.PathValue("id"), r.PathValue("action")
	var req api.StateChangeRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(r, &req); err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), id)
			return
		}
	}
	resp, err := s.deviceAction(id, action, req, op)
	if err != nil {
		s.fail(w, r, err, "device", id)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// handleGroupAction revokes, suspends or resumes every device of a group.
func (s *Server) handleGroupAction(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	group, action := r.PathValue("group"), r.PathValue("action")
	if err := identity.ValidateName(group); err != nil {
		s.badRequest(w, r, "invalid_group", "group: "+err.Error(), err)
		return
	}
	if action != "revoke" && action != "suspend" && action != "resume" {
		s.enroll.WriteError(w, r, apiErr(http.StatusNotFound, "unknown_action", "action must be revoke, suspend or resume", nil), "")
		return
	}
	var req api.StateChangeRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(r, &req); err != nil {
			s.fail(w, r, err, "", "")
			return
		}
	}
	if action == "revoke" && req.Reason == "" {
		s.badRequest(w, r, "reason_required", "revocation needs a reason", nil)
		return
	}
	if _, err := revocationReason(req); action == "revoke" && err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	ds, err := s.cfg.Registry.Devices()
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	resp := api.GroupActionResponse{Group: group, Devices: []api.StateChangeResponse{}}
	for _, d := range ds {
		if d.Group != group {
			continue
		}
		if (action == "suspend" && string(d.State) == "revoked") || (action == "resume" && string(d.State) != "suspended") {
			continue // nothing to do for it
		}
		res, err := s.deviceAction(d.ID, action, req, op)
		if err != nil {
			s.fail(w, r, err, "device", d.ID)
			return
		}
		if res.SessionsClosed {
			resp.SessionsClosed++
		}
		resp.Devices = append(resp.Devices, res)
	}
	if len(resp.Devices) == 0 && !s.groupExists(ds, group) {
		s.fail(w, r, notFound("group", group, nil), "", "")
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) groupExists(ds []fleet.Device, group string) bool {
	for _, d := range ds {
		if d.Group == group {
			return true
		}
	}
	return false
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
	reason, err := revocationReason(req)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	if err := s.cfg.Registry.RevokeCertificate(serial, reason, op.String()); err != nil {
		s.fail(w, r, err, "certificate", serial)
		return
	}
	s.enroll.RefreshCRL()
	writeJSON(w, http.StatusOK, api.StateChangeResponse{RevokedSerials: []string{serial}, SessionsClosed: true})
}
