package operator

import (
	"crypto/rand"
	"fmt"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Bootstrap tokens and service certificates.

func (s *Server) handleTokenCreate(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.TokenCreateRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	if err := identity.ValidateName(req.DeviceID); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	if _, taken := s.cfg.Registry.PrincipalRole(req.DeviceID); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, fleet.ReasonNameTaken, fmt.Sprintf("%q is a service or operator name; device IDs and names share the MQTT client ID namespace", req.DeviceID), nil), "")
		return
	}
	if req.Group == "" {
		req.Group = "default"
	}
	if err := identity.ValidateName(req.Group); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err), "")
		return
	}
	if req.TTL <= 0 {
		req.TTL = 24 * time.Hour
	}
	if req.TTL > s.cfg.MaxTokenTTL {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "ttl_too_long", fmt.Sprintf("token TTL %s exceeds the maximum %s", req.TTL, s.cfg.MaxTokenTTL), nil), "")
		return
	}
	tok, id, secret, err := enroll.NewToken(rand.Reader)
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	now := s.cfg.CA.Now()
	t := registry.Token{ID: id, Hash: registry.HashTokenSecret(secret), DeviceID: req.DeviceID, Group: req.Group,
		CreatedBy: op.String(), CreatedAt: now, ExpiresAt: now.Add(req.TTL)}
	if err := s.cfg.Registry.CreateToken(t, op.String()); err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), req.DeviceID)
		return
	}
	s.log.Info("bootstrap token created", logKeyDevice, req.DeviceID, "group", req.Group, "expires", t.ExpiresAt, logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, api.TokenCreateResponse{Token: tok, DeviceID: req.DeviceID, Group: req.Group, ExpiresAt: t.ExpiresAt})
}

func (s *Server) handleServiceIssue(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.ServiceIssueRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	id, err := identity.New(identity.RoleService, req.Name)
	if err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_name", err.Error(), err), "")
		return
	}
	// Service names and device IDs are both MQTT client IDs: one namespace.
	if _, taken := s.cfg.Registry.DeviceStatus(id.Name); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, fleet.ReasonNameTaken, fmt.Sprintf("%q is a device ID; service names and device IDs share the MQTT client ID namespace", id.Name), nil), "")
		return
	}
	if role, taken := s.cfg.Registry.PrincipalRole(id.Name); taken && role != identity.RoleService {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, fleet.ReasonNameTaken, fmt.Sprintf("%q is an %s's name", id.Name, role), nil), "")
		return
	}
	s.issuePrincipal(w, r, op, id, req.CSR, req.TTL, "service.issue")
}
