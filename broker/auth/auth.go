// Package auth is the single mochi hook of fleetgate's broker. It takes the
// identity from the verified client certificate, checks it against the
// registry's in-memory view (known serial, not revoked, device active),
// requires the MQTT client ID to equal the identity, and evaluates every
// publish and subscribe against the ACL policy. Deny by default.
//
// mochi ORs the answers of all hooks providing OnConnectAuthenticate and
// OnACLCheck, so no other hook providing those may ever be registered:
// broker.New refuses to start if one is.
package auth

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Directory is the registry view the hook consults. Implementations must be
// safe for concurrent use and answer from memory: the calls sit on the
// handshake and publish hot paths.
type Directory interface {
	// CertStatus reports a serial the registry issued; ok false if never.
	CertStatus(serial string) (registry.CertStatus, bool)
	// DeviceStatus reports a device's group and state; ok false if unknown.
	DeviceStatus(id string) (registry.DeviceStatus, bool)
	// PrincipalRole reports the role of a service or operator name.
	PrincipalRole(name string) (identity.Role, bool)
}

// Reasons for refusing a connection, used in logs and metric labels.
const (
	ReasonNoCert         = "no_cert"
	ReasonNoIdentity     = "no_identity"
	ReasonUnknownSerial  = "unknown_serial"
	ReasonRevoked        = "revoked"
	ReasonSuspended      = "suspended"
	ReasonUnknownDevice  = "unknown_device"
	ReasonExpired        = "expired"
	ReasonClientIDDiffer = "client_id_mismatch"
	ReasonIdentityDiffer = "identity_mismatch"
	ReasonWillDenied     = "will_denied"
)

// Errors returned by Check.
var (
	ErrNoCert         = errors.New("no verified client certificate")
	ErrUnknownSerial  = errors.New("certificate serial was never issued by the registry")
	ErrRevoked        = errors.New("certificate revoked")
	ErrSuspended      = errors.New("device suspended")
	ErrUnknownDevice  = errors.New("device unknown to the registry")
	ErrExpired        = errors.New("certificate expired")
	ErrIdentityDiffer = errors.New("certificate identity differs from the registry record")
)

// Reason maps a Check error to its reason label.
func Reason(err error) string {
	switch {
	case errors.Is(err, ErrNoCert):
		return ReasonNoCert
	case errors.Is(err, ErrUnknownSerial):
		return ReasonUnknownSerial
	case errors.Is(err, ErrRevoked):
		return ReasonRevoked
	case errors.Is(err, ErrSuspended):
		return ReasonSuspended
	case errors.Is(err, ErrUnknownDevice):
		return ReasonUnknownDevice
	case errors.Is(err, ErrExpired):
		return ReasonExpired
	case errors.Is(err, ErrIdentityDiffer):
		return ReasonIdentityDiffer
	}
	return ReasonNoIdentity
}

// Metrics are the hook's counters; nil functions are skipped.
type Metrics struct {
	AuthFailure func(reason string)
	ACLDenied   func(direction string)
	Connected   func(role identity.Role, delta int)
	Takeover    func()
}

// Options configure the hook.
type Options struct {
	TrustDomain string
	Directory   Directory
	// Policy returns the policy in force (it may be swapped at run time).
	Policy  func() *acl.Policy
	Logger  *slog.Logger
	Now     func() time.Time
	Metrics Metrics
	// LogRefusal, if set, reports whether a per-packet refusal (an ACL
	// denial) of the identity it is given may be logged: the broker
	// rate-limits these lines per identity and summarises the rest.
	LogRefusal func(identity string) bool
}

// Session is what the hook knows of one connected client.
type Session struct {
	Identity identity.Identity
	Serial   string
	NotAfter time.Time
	Client   *mqtt.Client
	online   atomic.Bool
	closing  atomic.Bool
}

// Online reports whether the session has a live connection.
func (s *Session) Online() bool { return s.online.Load() }

// MarkClosing reports true the first time it is called for a session: a
// revocation and its certificates' revocations close the session once.
func (s *Session) MarkClosing() bool { return s.closing.CompareAndSwap(false, true) }

// Hook is the one authentication/ACL hook.
type Hook struct {
	mqtt.HookBase
	o Options
	// sessions maps a client ID (= identity name) to its session. An entry
	// outlives the connection of a persistent session: mochi delivers
	// queued QoS 1/2 messages to the offline client object, and each
	// delivery passes the ACL check, which needs the identity.
	sessions sync.Map // string -> *Session
	count    atomic.Int64
}

// New returns the hook.
func New(o Options) *Hook {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Hook{o: o}
}

// ID implements mqtt.Hook.
func (h *Hook) ID() string { return "fleetgate-auth" }

// Provides implements mqtt.Hook.
func (h *Hook) Provides(b byte) bool {
	return bytes.Contains([]byte{
		mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPublish, mqtt.OnDisconnect, mqtt.OnClientExpired, mqtt.OnWill,
	}, []byte{b})
}

// Check verifies a certificate that crypto/tls already verified against the
// issuing CA: identity, registry serial, revocation, expiry, device state.
// It is called at the TLS handshake (VerifyConnection, also on resumption)
// and again at CONNECT.
func (h *Hook) Check(leaf *x509.Certificate) (identity.Identity, error) {
	if leaf == nil {
		return identity.Identity{}, ErrNoCert
	}
	id, err := identity.FromCertificate(leaf, h.o.TrustDomain)
	if err != nil {
		return id, err
	}
	st, ok := h.o.Directory.CertStatus(serialString(leaf))
	switch {
	case !ok:
		return id, ErrUnknownSerial
	case st.Revoked:
		return id, ErrRevoked
	case st.Identity != id:
		return id, ErrIdentityDiffer
	case !h.o.Now().Before(leaf.NotAfter):
		return id, ErrExpired
	}
	if id.Role == identity.RoleDevice {
		ds, ok := h.o.Directory.DeviceStatus(id.Name)
		switch {
		case !ok:
			return id, ErrUnknownDevice
		case ds.State == registry.StateRevoked:
			return id, ErrRevoked
		case ds.State == registry.StateSuspended:
			return id, ErrSuspended
		case ds.State != registry.StateActive:
			return id, ErrUnknownDevice
		}
	}
	return id, nil
}

// RefusedError is what VerifyConnection returns: the TLS listener, which
// knows the remote address, logs and counts it with its reason.
type RefusedError struct {
	Reason   string
	Identity identity.Identity
	Err      error
}

func (e *RefusedError) Error() string { return e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

// VerifyConnection is installed as tls.Config.VerifyConnection; crypto/tls
// runs it on full and on resumed handshakes.
func (h *Hook) VerifyConnection(cs tls.ConnectionState) error {
	var leaf *x509.Certificate
	if len(cs.VerifiedChains) > 0 && len(cs.VerifiedChains[0]) > 0 {
		leaf = cs.VerifiedChains[0][0]
	}
	id, err := h.Check(leaf)
	if err != nil {
		return &RefusedError{Reason: Reason(err), Identity: id, Err: err}
	}
	return nil
}

// ConnState exposes the TLS state of a client's connection.
type ConnState interface {
	ConnectionState() tls.ConnectionState
}

// OnConnectAuthenticate implements mqtt.Hook.
func (h *Hook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	// CONNECT is processed: free the connection's slot among unauthenticated
	// ones, whatever the outcome.
	if r, ok := cl.Net.Conn.(interface{ Release() }); ok {
		defer r.Release()
	}
	cs, ok := cl.Net.Conn.(ConnState)
	if !ok {
		h.refuse("connect", identity.Identity{}, cl.Net.Remote, ErrNoCert)
		return false
	}
	state := cs.ConnectionState()
	var leaf *x509.Certificate
	if len(state.VerifiedChains) > 0 && len(state.VerifiedChains[0]) > 0 {
		leaf = state.VerifiedChains[0][0]
	}
	id, err := h.Check(leaf)
	if err != nil {
		h.refuse("connect", id, cl.Net.Remote, err)
		return false
	}
	if cl.ID != id.Name { // clients may not pick their own ID
		h.o.Logger.Warn("connection refused", "reason", ReasonClientIDDiffer, "identity", id.String(), "client_id", cl.ID, "remote", cl.Net.Remote)
		if h.o.Metrics.AuthFailure != nil {
			h.o.Metrics.AuthFailure(ReasonClientIDDiffer)
		}
		return false
	}
	// A Last Will is a publish the broker makes later on the client's
	// behalf, and mochi sends it without any ACL check: check it now, with
	// the client's rights, and refuse the CONNECT if the policy would refuse
	// the publish. A delayed will is checked again (OnWill) when it is due:
	// a revocation, suspension or policy change during the delay drops it.
	if pk.Connect.WillFlag {
		if sub, ok := h.subject(&Session{Identity: id}); !ok || !h.o.Policy().CheckPublish(sub, pk.Connect.WillTopic, pk.Connect.WillRetain).Allowed {
			h.o.Logger.Warn("connection refused", "reason", ReasonWillDenied, "identity", id.String(), "will_topic", pk.Connect.WillTopic, "remote", cl.Net.Remote)
			if h.o.Metrics.AuthFailure != nil {
				h.o.Metrics.AuthFailure(ReasonWillDenied)
			}
			return false
		}
	}
	sess := &Session{Identity: id, Serial: serialString(leaf), NotAfter: leaf.NotAfter, Client: cl}
	sess.online.Store(true)
	if old, loaded := h.sessions.Swap(cl.ID, sess); loaded && old.(*Session).online.Swap(false) {
		// Session takeover: the earlier connection is being closed by mochi.
		h.count.Add(-1)
		if h.o.Metrics.Connected != nil {
			h.o.Metrics.Connected(old.(*Session).Identity.Role, -1)
		}
		h.o.Logger.Info("session taken over", "identity", id.String(), "remote", cl.Net.Remote)
		if h.o.Metrics.Takeover != nil {
			h.o.Metrics.Takeover()
		}
	}
	h.count.Add(1)
	if h.o.Metrics.Connected != nil {
		h.o.Metrics.Connected(id.Role, 1)
	}
	return true
}

func (h *Hook) refuse(stage string, id identity.Identity, remote string, err error) {
	reason := Reason(err)
	h.o.Logger.Warn("connection refused", "stage", stage, "reason", reason, "identity", id.String(), "remote", remote, "err", err)
	if h.o.Metrics.AuthFailure != nil {
		h.o.Metrics.AuthFailure(reason)
	}
}

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

// OnWill implements mqtt.Hook: at the moment mochi is about to send a Last
// Will, the client must still be allowed to publish it (its device active,
// the policy unchanged); otherwise the will is emptied and goes nowhere.
func (h *Hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	s, ok := h.Session(cl)
	if ok {
		if sub, ok := h.subject(s); ok && h.o.Policy().CheckPublish(sub, will.TopicName, will.Retain).Allowed {
			return will, nil
		}
	}
	h.o.Logger.Info("last will dropped", "client", cl.ID, "topic", will.TopicName)
	if h.o.Metrics.ACLDenied != nil {
		h.o.Metrics.ACLDenied("will")
	}
	return mqtt.Will{}, nil
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
		role, ok := h.o.Directory.PrincipalRole(cl.ID)
		if !ok {
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
		if !ok || ds.State != registry.StateActive {
			return sub, false
		}
		sub.Group = ds.Group
		sub.Tags = ds.Tags
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
	sub, ok := h.subject(s)
	if !ok {
		return false
	}
	p := h.o.Policy()
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
			h.o.Logger.Info("acl denied", "identity", s.Identity.String(), "direction", dir, "topic", logguard.Clip(topic, 0), "remote", cl.Net.Remote)
		}
		if h.o.Metrics.ACLDenied != nil {
			h.o.Metrics.ACLDenied(dir)
		}
	}
	return d.Allowed
}

// OnPublish implements mqtt.Hook: the retain flag needs a rule granting
// retain.
func (h *Hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if !pk.FixedHeader.Retain || cl.Net.Inline {
		return pk, nil
	}
	s, ok := h.Session(cl)
	if ok {
		if sub, ok := h.subject(s); ok && h.o.Policy().CheckPublish(sub, pk.TopicName, true).Allowed {
			return pk, nil
		}
	}
	if h.o.Metrics.ACLDenied != nil {
		h.o.Metrics.ACLDenied("retain")
	}
	if h.logRefusal(sessionName(s)) {
		h.o.Logger.Info("acl denied", "identity", sessionName(s), "direction", "retain", "topic", logguard.Clip(pk.TopicName, 0), "remote", cl.Net.Remote)
	}
	if cl.Properties.ProtocolVersion == 5 && pk.FixedHeader.Qos > 0 {
		return pk, packets.ErrNotAuthorized
	}
	return pk, packets.ErrRejectPacket
}

// logRefusal reports whether a per-packet refusal of identity id may be
// logged (Options.LogRefusal).
func (h *Hook) logRefusal(id string) bool {
	return h.o.LogRefusal == nil || h.o.LogRefusal(id)
}

func sessionName(s *Session) string {
	if s == nil {
		return ""
	}
	return s.Identity.String()
}

// Count returns the number of authenticated sessions.
func (h *Hook) Count() int64 { return h.count.Load() }

func serialString(c *x509.Certificate) string {
	return c.SerialNumber.Text(16)
}
