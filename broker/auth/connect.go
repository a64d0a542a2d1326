package auth

import (
	"crypto/tls"
	"crypto/x509"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Check verifies a certificate that crypto/tls already verified against the
// issuing CA: identity, registry serial, revocation, expiry, device state
// (directory.Verify).
// It is called at the TLS handshake (VerifyConnection, also on resumption)
// and again at CONNECT.
func (h *Hook) Check(leaf *x509.Certificate) (identity.Identity, error) {
	id, _, err := h.o.Directory.Verify(leaf, h.o.TrustDomain, h.o.Now())
	return id, err
}

// RefusedError is what VerifyConnection returns: the TLS listener, which
// knows the remote address, logs and counts it with its reason.
type RefusedError struct {
	Reason   fleet.Reason
	Identity identity.Identity
	// Leaf is the refused certificate (for the log line).
	Leaf *x509.Certificate
	Err  error
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
		return &RefusedError{Reason: directory.Reason(err), Identity: id, Leaf: leaf, Err: err}
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
		h.refuse(cl, identity.Identity{}, directory.ErrNoCert)
		return false
	}
	state := cs.ConnectionState()
	var leaf *x509.Certificate
	if len(state.VerifiedChains) > 0 && len(state.VerifiedChains[0]) > 0 {
		leaf = state.VerifiedChains[0][0]
	}
	id, err := h.Check(leaf)
	if err != nil {
		h.refuse(cl, id, err)
		return false
	}
	if !ClientIDMatches(cl.ID, id) { // clients may not pick their own ID (clientid.go)
		cl.RefuseConnect(ConnackReason(fleet.ReasonClientIDDiffer))
		h.o.Logger.Warn("connection refused", "reason", fleet.ReasonClientIDDiffer, "identity", id.String(),
			"client_id", logguard.Clip(cl.ID, 0), "want_client_id", id.Name, "remote", cl.Net.Remote)
		if h.o.Metrics.AuthFailure != nil {
			h.o.Metrics.AuthFailure(fleet.ReasonClientIDDiffer)
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
			cl.RefuseConnect(ConnackReason(fleet.ReasonWillDenied))
			h.o.Logger.Warn("connection refused", "reason", fleet.ReasonWillDenied, "identity", id.String(), "will_topic", logguard.Clip(pk.Connect.WillTopic, 0), "remote", cl.Net.Remote)
			if h.o.Metrics.AuthFailure != nil {
				h.o.Metrics.AuthFailure(fleet.ReasonWillDenied)
			}
			return false
		}
	}
	sess := &Session{Identity: id, Serial: fleet.SerialString(leaf.SerialNumber), NotAfter: leaf.NotAfter, Client: cl}
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

func (h *Hook) refuse(cl *mqtt.Client, id identity.Identity, err error) {
	reason := directory.Reason(err)
	cl.RefuseConnect(ConnackReason(reason))
	h.o.Logger.Warn("connection refused", "stage", "connect", "reason", reason, "identity", identityAttr(id), "remote", cl.Net.Remote, "err", err)
	if h.o.Metrics.AuthFailure != nil {
		h.o.Metrics.AuthFailure(reason)
	}
}

// ConnackReason is the CONNACK reason code with which a CONNECT refused for
// reason is answered, so that the device learns why: a client ID that is
// not the certificate's identity is 0x85 (client identifier not valid); a
// revoked device or certificate 0x8A (banned); a suspended device and a
// Last Will the policy refuses 0x87 (not authorized); a certificate the
// registry does not know, or that expired, 0x86 (bad user name or
// password: the credential is not valid). MQTT 3.1.1 clients get the 3.1.1
// codes (0x02 identifier rejected, 0x05 not authorized).
func ConnackReason(reason fleet.Reason) packets.Code {
	switch reason {
	case fleet.ReasonClientIDDiffer:
		return packets.ErrClientIdentifierNotValid
	case fleet.ReasonRevoked:
		return packets.ErrBanned
	case fleet.ReasonSuspended, fleet.ReasonWillDenied:
		return packets.ErrNotAuthorized
	}
	return packets.ErrBadUsernameOrPassword
}

// identityAttr is an identity for a log line: "" when there is none (not
// the "/" of the zero identity).
func identityAttr(id identity.Identity) string {
	if id.Name == "" && id.Role == "" {
		return ""
	}
	return id.String()
}
