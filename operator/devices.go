package operator

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Devices: list, show, attributes; the audit log; policy reload.

func (s *Server) toAPIDevice(d fleet.Device) api.Device {
	online := s.online(d.ID)
	return api.Device{ID: d.ID, Group: d.Group, State: string(d.State), AttestationMethod: d.AttestationMethod,
		Serial: d.CurrentSerial, NotAfter: d.NotAfter, CreatedAt: d.CreatedAt, Online: online, Tags: d.Tags}
}

// handleDeviceList lists devices sorted by ID, filtered by ?group=,
// ?state= and ?online=, a page at a time (?limit=, ?after=).
func (s *Server) handleDeviceList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	p, err := readPage(r)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	q := r.URL.Query()
	group, state, online := q.Get("group"), q.Get("state"), q.Get("online")
	switch fleet.DeviceState(state) {
	case "", fleet.StateRegistered, fleet.StateActive, fleet.StateSuspended, fleet.StateRevoked:
	default:
		s.badRequest(w, r, "invalid_state", "state must be registered, active, suspended or revoked", nil)
		return
	}
	if online != "" && online != "true" && online != "false" {
		s.badRequest(w, r, "invalid_online", "online must be true or false", nil)
		return
	}
	ds, err := s.cfg.Registry.Devices()
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	out := make([]api.Device, 0, len(ds))
	for _, d := range ds {
		if (group != "" && d.Group != group) || (state != "" && string(d.State) != state) || (p.after != "" && d.ID <= p.after) {
			continue
		}
		ad := s.toAPIDevice(d)
		if online != "" && ad.Online != (online == "true") {
			continue
		}
		if out = append(out, ad); len(out) == p.limit {
			break
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleDeviceShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	id := r.PathValue("id")
	if err := identity.ValidateName(id); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	d, err := s.cfg.Registry.Device(id)
	if err != nil {
		s.fail(w, r, err, "device", id)
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
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
			return
		}
	}
	limit := api.DefaultAuditLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_limit", "limit must be a positive number", err), "")
			return
		}
		limit = min(n, api.MaxAuditLimit)
	}
	recs, next, err := s.cfg.Registry.AuditPage(registry.AuditQuery{DeviceID: dev, Limit: limit, Cursor: q.Get("cursor")})
	if errors.Is(err, registry.ErrAuditCursor) {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_cursor", "cursor must be the next value of a previous page", err), "")
		return
	}
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
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
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	var req api.DeviceUpdateRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), id)
		return
	}
	if req.Group != "" {
		if err := identity.ValidateName(req.Group); err != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err), id)
			return
		}
	}
	for k, v := range req.Tags {
		// Tags are substituted into topic levels: same rules as names.
		if identity.ValidateName(k) != nil || identity.ValidateName(v) != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_tag", fmt.Sprintf("tag %q=%q: keys and values must be [a-z0-9-]{1,64}", k, v), nil), id)
			return
		}
	}
	d, err := s.cfg.Registry.UpdateAttributes(id, req.Group, req.Tags, op.String())
	if err != nil {
		s.fail(w, r, err, "device", id)
		return
	}
	writeJSON(w, http.StatusOK, s.toAPIDevice(*d))
}

func (s *Server) handlePolicyReload(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	if s.cfg.Broker == nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusNotImplemented, "no_broker", "no broker runs in this process; send SIGHUP to the broker process", nil), "")
		return
	}
	res, err := s.cfg.Broker.ReloadPolicy()
	rec := registry.AuditRecord{Actor: op.String(), Action: "policy.reload", Outcome: registry.OutcomeOK,
		Reason: fmt.Sprintf("%s: %d rules (%d compiled) in force", res.File, res.FileRules, res.Rules)}
	if err != nil {
		rec.Outcome, rec.Reason = registry.OutcomeDenied, err.Error()
	}
	s.cfg.Registry.Audit(rec)
	if err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusUnprocessableEntity, "policy_invalid", "policy refused, the previous one stays in force:\n"+err.Error(), err), "")
		return
	}
	writeJSON(w, http.StatusOK, res)
}
