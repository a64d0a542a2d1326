package broker

import (
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/broker/auth"
)

// What a cluster node's router (broker/cluster, added through
// Config.Hooks) needs of the broker.

// FanoutClientID is the inline client through which the broker fans a
// QoS 1/2 message out before acknowledging it: its publishes are copies of
// messages hooks have already seen.
const FanoutClientID = fanoutClientID

// MQTT is the embedded mochi server.
func (b *Broker) MQTT() *mqtt.Server { return b.server }

// Auth is the authentication/ACL hook (sessions by client ID).
func (b *Broker) Auth() *auth.Hook { return b.hook }

// CloseSessions closes every live session with the MQTT 5 DISCONNECT
// reason code (MQTT 3.1.1 clients: the connection is closed) and returns
// how many it closed; reason labels fleetgate_broker_sessions_closed_total.
// Persistent sessions stay (offline); wills go through the hooks as at any
// abnormal end (a cluster node's router decides whether one is sent).
func (b *Broker) CloseSessions(reason string, code packets.Code) int {
	n := 0
	b.hook.Sessions(func(s *auth.Session) bool {
		if !s.Online() || s.Client == nil || !s.MarkClosing() {
			return true
		}
		b.log.Debug("closing session", "identity", s.Identity.String(), "reason", reason, "remote", s.Client.Net.Remote)
		b.m.closed.WithLabelValues(reason).Inc()
		_ = b.server.DisconnectClient(s.Client, code)
		s.Client.Stop(code)
		b.hook.MarkOffline(s)
		n++
		return true
	})
	return n
}

// OfflineQuota is how many QoS 1/2 messages cl's persistent session holds
// while its client is offline (its role's MaxOffline; 0: no quota): what a
// node replaying the session from the cluster's stream queues at most.
func (b *Broker) OfflineQuota(cl *mqtt.Client) int { return b.queuePolicy(cl).MaxOffline }

// DropSession forgets the offline session cl for good, as if it had
// expired: the auth hook's state and the stored records (a cluster node
// drops the leftover copy of a session another node owns now). The caller
// has taken it out of the broker's clients and topics.
func (b *Broker) DropSession(cl *mqtt.Client) {
	b.hook.OnClientExpired(cl)
	if b.storage != nil {
		b.storage.OnClientExpired(cl)
	}
}

// OriginRevoked reports whether origin, the client ID a routed message
// was published with, names a device revoked in this node's directory. A
// node that had not yet learnt of a revocation (within its staleness
// bound) may have accepted, and stored in the cluster's stream, messages
// the device sent after the revoke; the nodes that deliver them drop
// them. Revocation is terminal, and a compromised device's data is not
// trusted: what it published before the revoke and was not yet delivered
// is dropped too.
func (b *Broker) OriginRevoked(origin string) bool {
	return origin != "" && b.deviceRevoked(origin)
}
