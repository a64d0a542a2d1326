package auth

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// subject builds the ACL subject of a session, reading the device's current
// group, so group changes apply without reconnect. ok is false if the
// device is no longer active.
func (h *Hook) subject(s *Session) (acl.Subject, bool) {
	sub := acl.Subject{Role: s.Identity.Role, ID: s.Identity.Name}
	// The session's own certificate, too: revoking one certificate (or its
	// expiry) ends what its session may do, even before the session is
	// closed.
	if s.Serial != "" {
		if cs, ok := h.o.Directory.CertStatus(s.Serial); !ok || cs.Revoked || !h.o.Now().Before(s.NotAfter) {
			return sub, false
		}
	}
	if s.Identity.Role == identity.RoleDevice {
		ds, ok := h.o.Directory.DeviceStatus(s.Identity.Name)
		if !ok || ds.State != fleet.StateActive {
			return sub, false
		}
		sub.Group = ds.Group
		sub.Tags = ds.Tags
		sub.Attestation = ds.Method
	}
	return sub, true
}

// OnACLCheck implements mqtt.Hook: deny unless the policy allows. Called by
// mochi for publish (write), subscribe (read, a filter) and delivery (read,
// a topic, also to an offline persistent session).
func (h *Hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	s, ok := h.Session(cl)
	if !ok && !write {
		s, ok = h.restored(cl)
	}
	if !ok || (write && s.Client != cl) {
		return false
	}
	// A decision allowed under the same directory generation and policy
	// holds while the certificate has not expired (aclcache.go). The
	// generation is read before subject reads the directory.
	gen, p := h.o.Directory.Generation(), h.o.Policy()
	slot := s.acl.slot(write, topic, s.Identity.Role)
	if slot.Load().hit(topic, gen, p) && (s.Serial == "" || h.o.Now().Before(s.NotAfter)) {
		return true
	}
	sub, ok := h.subject(s)
	if !ok {
		return false
	}
	var d acl.Decision
	if write {
		d = p.CheckPublish(sub, topic, false)
	} else {
		d = p.CheckSubscribe(sub, topic)
	}
	if !d.Allowed {
		dir := "subscribe"
		if write {
			dir = "publish"
		}
		if h.logRefusal(s.Identity.String()) {
			h.o.Logger.Info("acl denied", "identity", s.Identity.String(), "direction", dir, "topic", logguard.Clip(topic, 0),
				"rule", p.Explain(d), "remote", cl.Net.Remote)
		}
		if h.o.Metrics.ACLDenied != nil {
			h.o.Metrics.ACLDenied(dir)
		}
		return false
	}
	storeAllowed(slot, gen, p, topic) // aclcache.go
	return true
}

// OnPublish implements mqtt.Hook: the retain flag needs a rule granting
// retain.
func (h *Hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !pk.FixedHeader.Retain || cl.Net.Inline {
		return pk, nil
	}
	s, ok := h.Session(cl)
	rule := "session not active"
	if ok {
		if sub, ok := h.subject(s); ok {
			p := h.o.Policy()
			d := p.CheckPublish(sub, pk.TopicName, true)
			if d.Allowed {
				return pk, nil
			}
			rule = p.Explain(d)
		}
	}
	if h.o.Metrics.ACLDenied != nil {
		h.o.Metrics.ACLDenied("retain")
	}
	if h.logRefusal(sessionName(s)) {
		h.o.Logger.Info("acl denied", "identity", sessionName(s), "direction", "retain", "topic", logguard.Clip(pk.TopicName, 0),
			"rule", rule, "remote", cl.Net.Remote)
	}
	if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0 {
		return pk, packets.ErrNotAuthorized
	}
	return pk, packets.ErrRejectPacket
}
