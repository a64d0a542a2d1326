package registry

import (
	"time"

	"github.com/fleetgate/fleetgate/identity"
)

// DeviceState is the lifecycle state of a device.
type DeviceState string

// Device states.
const (
	// StateRegistered: known from manufacturing, not enrolled yet.
	StateRegistered DeviceState = "registered"
	// StateActive: enrolled; may connect.
	StateActive DeviceState = "active"
	// StateSuspended: reversibly refused everywhere.
	StateSuspended DeviceState = "suspended"
	// StateRevoked: terminally refused everywhere.
	StateRevoked DeviceState = "revoked"
)

// Attestation methods recorded on a device.
const (
	MethodToken = "token"
	MethodTPM   = "tpm"
)

// Device is a device record. Attributes live here, not in certificates.
type Device struct {
	ID                string            `json:"id"`
	Group             string            `json:"group"`
	Tags              map[string]string `json:"tags,omitempty"`
	State             DeviceState       `json:"state"`
	AttestationMethod string            `json:"attestation_method,omitempty"`
	// EKFingerprint is the SHA-256 of the EK public key (SPKI), hex.
	EKFingerprint string    `json:"ek_fingerprint,omitempty"`
	CurrentSerial string    `json:"current_serial,omitempty"`
	NotAfter      time.Time `json:"not_after,omitzero"`
	CreatedAt     time.Time `json:"created_at"`
	UpdatedAt     time.Time `json:"updated_at"`
}

// Certificate is the record of an issued certificate.
type Certificate struct {
	Serial       string        `json:"serial"`
	Role         identity.Role `json:"role"`
	Name         string        `json:"name"`
	NotBefore    time.Time     `json:"not_before"`
	NotAfter     time.Time     `json:"not_after"`
	IssuedAt     time.Time     `json:"issued_at"`
	DER          []byte        `json:"der"`
	Revoked      bool          `json:"revoked,omitempty"`
	RevokedAt    time.Time     `json:"revoked_at,omitzero"`
	RevokeReason string        `json:"revoke_reason,omitempty"`
}

// Identity returns the certificate's principal.
func (c *Certificate) Identity() identity.Identity {
	return identity.Identity{Role: c.Role, Name: c.Name}
}

// Token is a stored bootstrap token. Only a hash of its secret is kept.
type Token struct {
	ID        string    `json:"id"`
	Hash      []byte    `json:"hash"`
	DeviceID  string    `json:"device_id"`
	Group     string    `json:"group"`
	CreatedBy string    `json:"created_by"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
	UsedAt    time.Time `json:"used_at,omitzero"`
}

// AuditRecord is one append-only audit entry.
type AuditRecord struct {
	Seq      uint64    `json:"seq"`
	Time     time.Time `json:"time"`
	Actor    string    `json:"actor"`
	Action   string    `json:"action"`
	DeviceID string    `json:"device_id,omitempty"`
	Outcome  string    `json:"outcome"`
	Reason   string    `json:"reason,omitempty"`
	Remote   string    `json:"remote,omitempty"`
	Serial   string    `json:"serial,omitempty"`
}

// Audit outcomes.
const (
	OutcomeOK     = "ok"
	OutcomeDenied = "denied"
)

// CertStatus is the in-memory view of one certificate the broker consults on
// every handshake.
type CertStatus struct {
	Identity identity.Identity
	NotAfter time.Time
	Revoked  bool
}

// DeviceStatus is the in-memory view of one device.
type DeviceStatus struct {
	Group string
	State DeviceState
	// Tags are shared, never mutated: an update replaces the map.
	Tags map[string]string
}

// EventKind says what changed.
type EventKind int

// Events a watcher is told of.
const (
	EventCertIssued EventKind = iota + 1
	EventCertRevoked
	EventDeviceChanged
)

// Event is a committed change, delivered to watchers after the commit.
type Event struct {
	Kind     EventKind
	Serial   string
	DeviceID string
	State    DeviceState
}

// status is the in-memory view of d.
func (d *Device) status() DeviceStatus {
	return DeviceStatus{Group: d.Group, State: d.State, Tags: d.Tags}
}
