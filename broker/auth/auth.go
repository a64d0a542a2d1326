// Package auth is the single mochi hook of fleetgate's broker. It takes the
// identity from the verified client certificate, checks it against the
// directory, the in-memory view of the registry (known serial, not
// revoked, device active: directory.Verify),
// requires the MQTT client ID to equal the identity, and evaluates every
// publish and subscribe against the ACL policy. Deny by default.
//
// mochi ORs the answers of all hooks providing OnConnectAuthenticate and
// OnACLCheck, so no other hook providing those may ever be registered:
// broker.New refuses to start if one is.
package auth

import (
	"bytes"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Refusal reasons are fleet.Reason values and the errors of Check are the
// directory's (directory.Verify, directory.Reason maps one to the other):
// the hook has no vocabulary of its own.

// Metrics are the hook's counters; nil functions are skipped.
type Metrics struct {
	AuthFailure func(reason fleet.Reason)
	ACLDenied   func(direction string)
	Connected   func(role identity.Role, delta int)
	Takeover    func()
}

// Options configure the hook.
type Options struct {
	TrustDomain string
	// Directory is the in-memory view of devices and certificates that
	// every check reads (the registry's, or a replica's).
	Directory *directory.Directory
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
