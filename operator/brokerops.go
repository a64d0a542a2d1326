package operator

import (
	"net/http"
	"strings"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// The broker of this process: clients and sessions, retained messages,
// the policy in force.

// broker returns the broker, or writes a 501 and false.
func (s *Server) broker(w http.ResponseWriter, r *http.Request) (Broker, bool) {
	if s.cfg.Broker == nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusNotImplemented, "no_broker", "no broker runs in this process", nil), "")
		return nil, false
	}
	return s.cfg.Broker, true
}

// clientIDOK: a client ID is an identity name, or <name>:<suffix>.
func clientIDOK(id string) bool {
	name, suffix, has := strings.Cut(id, ":")
	return identity.ValidateName(name) == nil && (!has || identity.ValidateName(suffix) == nil)
}

func (s *Server) handleClientList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	p, err := readPage(r)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	q := r.URL.Query()
	online, role, group := q.Get("online"), q.Get("role"), q.Get("group")
	if online != "" && online != "true" && online != "false" {
		s.badRequest(w, r, "invalid_online", "online must be true or false", nil)
		return
	}
	out := []api.Client{}
	for _, c := range b.Clients() {
		if online != "" && (online == "true") != c.Online {
			continue
		}
		if role != "" && !strings.HasPrefix(c.Identity, role+"/") {
			continue
		}
		if group != "" {
			name, _ := strings.CutPrefix(c.Identity, "device/")
			if st, ok := s.cfg.Registry.DeviceStatus(name); !ok || st.Group != group {
				continue
			}
		}
		out = append(out, c)
	}
	writeJSON(w, http.StatusOK, cut(p, out, func(c api.Client) string { return c.ClientID }))
}

func (s *Server) handleClientShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	id := r.PathValue("id")
	if !clientIDOK(id) {
		s.badRequest(w, r, "invalid_client_id", "a client ID is a device ID or name, or <name>:<suffix>", nil)
		return
	}
	for _, c := range b.Clients() {
		if c.ClientID == id {
			writeJSON(w, http.StatusOK, c)
			return
		}
	}
	s.fail(w, r, notFound("client", id, nil), "", "")
}

func (s *Server) handleClientDisconnect(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	id := r.PathValue("id")
	if !clientIDOK(id) {
		s.badRequest(w, r, "invalid_client_id", "a client ID is a device ID or name, or <name>:<suffix>", nil)
		return
	}
	was, found := b.Disconnect(id)
	if !found {
		s.fail(w, r, notFound("client", id, nil), "", "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "client.disconnect", Outcome: registry.OutcomeOK, Reason: "client " + id, Remote: r.RemoteAddr})
	writeJSON(w, http.StatusOK, api.DisconnectResponse{ClientID: id, WasOnline: was})
}

func (s *Server) handleRetainedList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	p, err := readPage(r)
	if err != nil {
		s.fail(w, r, err, "", "")
		return
	}
	filter := r.URL.Query().Get("filter")
	if filter == "" {
		filter = "#"
	}
	if !filterOK(filter) {
		s.badRequest(w, r, "invalid_filter", "filter must be an MQTT topic filter ('+' and '#' as whole levels, '#' last)", nil)
		return
	}
	writeJSON(w, http.StatusOK, cut(p, b.Retained(filter), func(m api.Retained) string { return m.Topic }))
}

func (s *Server) handleRetainedDelete(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	topic := r.URL.Query().Get("topic")
	if topic == "" || strings.ContainsAny(topic, "+#\x00") || len(topic) > 65535 {
		s.badRequest(w, r, "invalid_topic", "topic must be a topic name (no wildcards)", nil)
		return
	}
	n := b.DeleteRetained(topic)
	if n == 0 {
		s.fail(w, r, notFound("retained message on topic", topic, nil), "", "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "retained.delete", Outcome: registry.OutcomeOK, Reason: topic, Remote: r.RemoteAddr})
	writeJSON(w, http.StatusOK, api.RetainedDeleteResponse{Deleted: n})
}

// filterOK checks an MQTT topic filter's wildcards.
func filterOK(f string) bool {
	if f == "" || strings.ContainsRune(f, 0) || len(f) > 65535 {
		return false
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		if l == "#" && i != len(levels)-1 {
			return false
		}
		if l != "#" && l != "+" && strings.ContainsAny(l, "+#") {
			return false
		}
	}
	return true
}

func (s *Server) handlePolicyShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	b, ok := s.broker(w, r)
	if !ok {
		return
	}
	writeJSON(w, http.StatusOK, b.Policy())
}
