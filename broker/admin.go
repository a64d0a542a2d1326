package broker

import (
	"bytes"
	"sort"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/broker/auth"
)

// What the operator API asks of the broker: its sessions (who, from
// where, since when, subscriptions, queued messages), disconnecting one,
// and its retained messages.

// adminHook records when each connection's session was established.
type adminHook struct {
	mqtt.HookBase
	since sync.Map // *mqtt.Client → time.Time
	now   func() time.Time
}

func (h *adminHook) ID() string { return "fleetgate-admin" }

func (h *adminHook) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnSessionEstablished, mqtt.OnDisconnect}, []byte{b})
}

func (h *adminHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.since.Store(cl, h.now().UTC())
}

func (h *adminHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) { h.since.Delete(cl) }

// addAdminHook adds the hook Clients reads the connection times from.
func (b *Broker) addAdminHook() error {
	b.admin = &adminHook{now: b.cfg.Now}
	return b.addHook(b.admin, nil)
}

// clientName is the identity name of a client ID: a service's further
// connections are <name>:<suffix>.
func clientName(clientID string) string {
	name, _, _ := strings.Cut(clientID, ":")
	return name
}

// Online returns the number of live connections of name: client ID name
// and name:<suffix> (a service running several connections).
func (b *Broker) Online(name string) int {
	n := 0
	b.hook.Sessions(func(s *auth.Session) bool {
		if s.Online() && (s.Client.ID == name || strings.HasPrefix(s.Client.ID, name+":")) {
			n++
		}
		return true
	})
	return n
}

// Clients returns every session the broker knows, online or persistent
// offline, sorted by client ID.
func (b *Broker) Clients() []api.Client {
	out := []api.Client{}
	b.hook.Sessions(func(s *auth.Session) bool {
		cl := s.Client
		c := api.Client{ClientID: cl.ID, Identity: s.Identity.String(), Online: s.Online(), Subscriptions: []string{}}
		if c.Online {
			c.Remote = cl.Net.Remote
			if t, ok := b.admin.since.Load(cl); ok {
				c.Since = t.(time.Time)
			}
		}
		for f := range cl.State.Subscriptions.GetAll() {
			c.Subscriptions = append(c.Subscriptions, f)
		}
		sort.Strings(c.Subscriptions)
		if cl.State.Inflight != nil {
			c.Queued = cl.State.Inflight.Len()
		}
		out = append(out, c)
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ClientID < out[j].ClientID })
	return out
}

// Disconnect closes the live connection of clientID (MQTT 5: DISCONNECT
// 0x98 administrative action); its persistent session stays. found is
// false if the broker knows no session of clientID.
func (b *Broker) Disconnect(clientID string) (wasOnline, found bool) {
	s, ok := b.hook.Lookup(clientID)
	if !ok {
		return false, false
	}
	if !s.Online() {
		return false, true
	}
	b.log.Info("disconnecting client (operator)", "client_id", clientID, "identity", s.Identity.String())
	b.m.closed.WithLabelValues("operator").Inc()
	_ = b.server.DisconnectClient(s.Client, packets.ErrAdministrativeAction)
	s.Client.Stop(packets.ErrAdministrativeAction)
	b.hook.MarkOffline(s)
	return true, true
}

// retainedPreview bounds the payload bytes Retained returns.
const retainedPreview = 256

// Retained returns the retained messages matching filter, sorted by topic.
func (b *Broker) Retained(filter string) []api.Retained {
	out := []api.Retained{}
	for _, pk := range b.server.Topics.Messages(filter) {
		m := api.Retained{Topic: pk.TopicName, QoS: pk.FixedHeader.Qos, Size: len(pk.Payload), Publisher: retainedDevice(pk)}
		m.Payload = append([]byte(nil), pk.Payload[:min(len(pk.Payload), retainedPreview)]...)
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Topic < out[j].Topic })
	return out
}

// DeleteRetained deletes the retained message of topic, in memory and in
// storage, and returns how many it deleted (0 or 1).
func (b *Broker) DeleteRetained(topic string) int {
	n := b.server.ClearRetained(func(pk packets.Packet) bool { return pk.TopicName == topic })
	if n > 0 {
		b.log.Info("retained message deleted (operator)", "topic", topic)
	}
	return n
}
