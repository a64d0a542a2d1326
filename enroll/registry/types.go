package registry

import "time"

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
	// RevokedAt is set by RevokeToken (which also ends ExpiresAt).
	RevokedAt time.Time `json:"revoked_at,omitzero"`
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
