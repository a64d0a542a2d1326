// Package fleet holds the types every part of fleetgate shares: devices and
// their states, certificate records, the in-memory status of a certificate
// and of a device, change events, the formatting of certificate serials, and
// one vocabulary of refusal reasons (reasons.go).
//
// It is on the ground floor: it imports only identity, and the enrollment
// service, the broker, the directory and the operator API all import it.
package fleet

import (
	"math/big"
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

// Status is the in-memory view of d.
func (d *Device) Status() DeviceStatus {
	return DeviceStatus{Group: d.Group, State: d.State, Tags: d.Tags, Method: d.AttestationMethod}
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

// Status is the in-memory view of c.
func (c *Certificate) Status() CertStatus {
	return CertStatus{Identity: c.Identity(), NotAfter: c.NotAfter, Revoked: c.Revoked}
}

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
	// Method is how the device proved itself at enrollment (MethodToken,
	// MethodTPM; "" if unknown): policy rules may require it.
	Method string
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

// SerialString is the one text form of a certificate serial: lower-case
// hexadecimal without leading zeros. Records, the directory, the feed and
// the CRL tools all key certificates by it.
func SerialString(n *big.Int) string { return n.Text(16) }
