package operator

import (
	"net/http"
	"regexp"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// Bootstrap tokens: list (?state=unused|used|expired|revoked, ?device=)
// and revoke.

var tokenIDRe = regexp.MustCompile(`^[0-9a-f]{16}$`)

var tokenStates = map[string]bool{registry.TokenUnused: true, registry.TokenUsed: true, registry.TokenExpired: true, registry.TokenRevoked: true}

func toAPIToken(t registry.Token, state string) api.Token {
	return api.Token{ID: t.ID, DeviceID: t.DeviceID, Group: t.Group, State: state, CreatedBy: t.CreatedBy,
		CreatedAt: t.CreatedAt, ExpiresAt: t.ExpiresAt, UsedAt: t.UsedAt, RevokedAt: t.RevokedAt}
}

func (s *Server) handleTokenList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	p, err := readPage(r)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	q := r.URL.Query()
	state, dev, group := q.Get("state"), q.Get("device"), q.Get("group")
	if state != "" && !tokenStates[state] {
		s.badRequest(w, r, "invalid_state", "state must be unused, used, expired or revoked", nil)
		return
	}
	ts, err := s.cfg.Registry.Tokens()
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	now := s.cfg.CA.Now()
	out := []api.Token{}
	for _, t := range ts {
		st := registry.TokenState(t, now)
		if (state != "" && st != state) || (dev != "" && t.DeviceID != dev) || (group != "" && t.Group != group) {
			continue
		}
		out = append(out, toAPIToken(t, st))
	}
	writeJSON(w, http.StatusOK, cut(p, out, func(t api.Token) string { return t.ID }))
}

func (s *Server) handleTokenRevoke(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id := r.PathValue("id")
	if !tokenIDRe.MatchString(id) {
		s.badRequest(w, r, "invalid_token_id", "a token ID is 16 hex digits (the part after fgt_, as `tokens list` prints it)", nil)
		return
	}
	t, err := s.cfg.Registry.RevokeToken(id, op.String())
	if err != nil {
		s.fail(w, r, err, "token", id)
		return
	}
	writeJSON(w, http.StatusOK, toAPIToken(t, registry.TokenState(t, s.cfg.CA.Now())))
}
