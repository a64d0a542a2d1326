package auth

import (
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/identity"
)

// Session is what the hook knows of one connected client.
type Session struct {
	Identity identity.Identity
	Serial   string
	NotAfter time.Time
	Client   *mqtt.Client
	online   atomic.Bool
	closing  atomic.Bool
	acl      aclCache // recent allowed ACL decisions (aclcache.go)
}

// Online reports whether the session has a live connection.
func (s *Session) Online() bool { return s.online.Load() }

// MarkClosing reports true the first time it is called for a session: a
// revocation and its certificates' revocations close the session once.
func (s *Session) MarkClosing() bool { return s.closing.CompareAndSwap(false, true) }

// OnDisconnect implements mqtt.Hook. A persistent session stays known
// (offline) until mochi expires it.
func (h *Hook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	v, ok := h.sessions.Load(cl.ID)
	if !ok {
		return
	}
	s := v.(*Session)
	if s.Client != cl {
		return // an older connection that was taken over
	}
	h.MarkOffline(s)
	if expire {
		h.sessions.CompareAndDelete(cl.ID, s)
	}
}

// MarkOffline records that s has no live connection any more. The broker
// calls it when it closes a session itself, so that the state is exact when
// the revoke call returns, before mochi's read loop notices.
func (h *Hook) MarkOffline(s *Session) {
	if s.online.Swap(false) {
		h.count.Add(-1)
		if h.o.Metrics.Connected != nil {
			h.o.Metrics.Connected(s.Identity.Role, -1)
		}
	}
}

// OnClientExpired implements mqtt.Hook: a persistent session expired.
func (h *Hook) OnClientExpired(cl *mqtt.Client) {
	if v, ok := h.sessions.Load(cl.ID); ok && v.(*Session).Client == cl {
		h.sessions.CompareAndDelete(cl.ID, v)
	}
}

// Session returns what the hook knows of cl, online or not.
func (h *Hook) Session(cl *mqtt.Client) (*Session, bool) {
	v, ok := h.sessions.Load(cl.ID)
	if !ok {
		return nil, false
	}
	return v.(*Session), true
}

// Sessions calls fn for every known session, online or persistent offline.
func (h *Hook) Sessions(fn func(*Session) bool) {
	h.sessions.Range(func(_, v any) bool { return fn(v.(*Session)) })
}

// restored returns a session for a persistent session that mochi restored
// from storage after a restart and whose client has not reconnected yet:
// deliveries to it are checked as the identity whose name is its client ID
// (client IDs are identities, enforced at CONNECT, so nothing else could
// have created it). Without this, messages for a backend service that
// reconnects after the devices would be refused and lost.
func (h *Hook) restored(cl *mqtt.Client) (*Session, bool) {
	if cl.Net.Inline || cl.Net.Conn != nil {
		return nil, false
	}
	id := identity.Identity{Role: identity.RoleDevice, Name: cl.ID}
	if _, ok := h.o.Directory.DeviceStatus(cl.ID); !ok {
		id.Name = nameOfClientID(cl.ID) // a service's further connections
		role, ok := h.o.Directory.PrincipalRole(id.Name)
		if !ok || (id.Name != cl.ID && role != identity.RoleService) {
			return nil, false
		}
		id.Role = role
	}
	s := &Session{Identity: id, Client: cl}
	if v, loaded := h.sessions.LoadOrStore(cl.ID, s); loaded {
		return v.(*Session), true
	}
	return s, true
}

// Lookup returns the session of a client ID.
func (h *Hook) Lookup(clientID string) (*Session, bool) {
	v, ok := h.sessions.Load(clientID)
	if !ok {
		return nil, false
	}
	return v.(*Session), true
}

// Count returns the number of authenticated sessions.
func (h *Hook) Count() int64 { return h.count.Load() }
