package broker

import (
	"bytes"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/identity"
)

// SessionEvent is an authenticated connection that started or ended, as
// WatchSessions reports it (the web console's live view).
type SessionEvent struct {
	Identity  identity.Identity
	Connected bool // false: disconnected
	Remote    string
	Time      time.Time
	// Reason the connection ended (disconnected only; may be empty).
	Reason string
}

// WatchSessions calls fn for every authenticated connection that starts
// or ends from now on, on the client's goroutine: fn must not block.
// Inline clients and connections taken over by a newer one of the same
// identity are not reported as ended.
func (b *Broker) WatchSessions(fn func(SessionEvent)) error {
	return b.server.AddHook(&sessionWatch{b: b, fn: fn}, nil)
}

type sessionWatch struct {
	mqtt.HookBase
	b  *Broker
	fn func(SessionEvent)
}

func (h *sessionWatch) ID() string { return "fleetgate-session-watch" }

func (h *sessionWatch) Provides(b byte) bool {
	return bytes.Contains([]byte{mqtt.OnSessionEstablished, mqtt.OnDisconnect}, []byte{b})
}

func (h *sessionWatch) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	h.report(cl, true, nil)
}

func (h *sessionWatch) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	if cl.Net.Conn == nil { // a session restored from storage
		return
	}
	h.report(cl, false, err)
}

func (h *sessionWatch) report(cl *mqtt.Client, connected bool, cause error) {
	s, ok := h.b.hook.Lookup(cl.ID)
	if !ok || cl.Net.Inline || (!connected && s.Client != cl) {
		return
	}
	ev := SessionEvent{Identity: s.Identity, Connected: connected, Remote: cl.Net.Remote, Time: h.b.cfg.Now().UTC()}
	if cause != nil {
		ev.Reason = cause.Error()
	}
	h.fn(ev)
}
