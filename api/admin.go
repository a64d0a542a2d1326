package api

import "time"

// Admin API paths of the operator CLI's lists and actions (operator mTLS).
// Every list is a JSON array sorted by its key and takes ?limit= (at most
// MaxListLimit) and ?after= (the key of the last item of the previous
// page), and filters of its own.
const (
	// PathAdminToken is followed by {id}/revoke.
	PathAdminToken = "/v1/admin/tokens/"
	// PathAdminService is followed by {name}, {name}/renew, {name}/revoke.
	PathAdminService   = "/v1/admin/services/"
	PathAdminOperators = "/v1/admin/operators"
	// PathAdminOperator is followed by {name}/remove (POST, with a reason).
	PathAdminOperator = "/v1/admin/operators/"
	PathAdminClients  = "/v1/admin/clients"
	// PathAdminClient is followed by {id} (GET) and {id}/disconnect (POST).
	PathAdminClient   = "/v1/admin/clients/"
	PathAdminRetained = "/v1/admin/retained"
	PathAdminPolicy   = "/v1/admin/policy"
	// PathAdminGroup is followed by {group}/revoke, /suspend or /resume.
	PathAdminGroup = "/v1/admin/groups/"
	// PathAdminWhoAmI returns the calling operator (Operator).
	PathAdminWhoAmI = "/v1/admin/whoami"
)

// MaxListLimit is the most items one page of a list holds.
const MaxListLimit = 1000

// Token is a bootstrap token as the admin API lists it (never its secret).
type Token struct {
	ID        string    `json:"id"`
	DeviceID  string    `json:"device_id"`
	Group     string    `json:"group"`
	State     string    `json:"state"` // unused, used, expired, revoked
	CreatedBy string    `json:"created_by"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
	UsedAt    time.Time `json:"used_at,omitzero"`
	RevokedAt time.Time `json:"revoked_at,omitzero"`
}

// Certificate is one certificate of a service or operator.
type Certificate struct {
	Serial       string    `json:"serial"`
	NotBefore    time.Time `json:"not_before"`
	NotAfter     time.Time `json:"not_after"`
	IssuedAt     time.Time `json:"issued_at"`
	Revoked      bool      `json:"revoked,omitempty"`
	RevokedAt    time.Time `json:"revoked_at,omitzero"`
	RevokeReason string    `json:"revoke_reason,omitempty"`
}

// Service is a service name and its certificates.
type Service struct {
	Name     string `json:"name"`
	Identity string `json:"identity"`
	// State is active (a valid certificate), expired or revoked.
	State        string        `json:"state"`
	NotAfter     time.Time     `json:"not_after,omitzero"`
	Online       int           `json:"online"` // live connections (<name> and <name>:<suffix>)
	Certificates []Certificate `json:"certificates,omitempty"`
}

// ServiceRenewRequest issues a new certificate for an existing service
// (POST /v1/admin/services/{name}/renew): the server generates the key
// unless CSR is set.
type ServiceRenewRequest struct {
	CSR []byte        `json:"csr,omitempty"`
	TTL time.Duration `json:"ttl,omitempty"`
}

// Operator roles.
const (
	OperatorAdmin    = "admin"
	OperatorReadOnly = "read-only"
	// OperatorNoRole is shown for an operator without a role (removed):
	// it may do nothing.
	OperatorNoRole = "none"
)

// Operator is an operator name, its role and its certificates.
type Operator struct {
	Name         string        `json:"name"`
	Role         string        `json:"role"`
	State        string        `json:"state"`
	NotAfter     time.Time     `json:"not_after,omitzero"`
	Certificates []Certificate `json:"certificates,omitempty"`
}

// OperatorAddRequest adds an operator (POST /v1/admin/operators): the
// server generates its key unless CSR is set.
type OperatorAddRequest struct {
	Name string        `json:"name"`
	Role string        `json:"role"` // admin (default) or read-only
	CSR  []byte        `json:"csr,omitempty"`
	TTL  time.Duration `json:"ttl,omitempty"`
}

// CertificateResponse returns an issued certificate: the chain, and the
// key only when the server generated it.
type CertificateResponse = ServiceIssueResponse

// RemoveResponse reports the certificates a removal or revocation revoked.
type RemoveResponse struct {
	Name           string   `json:"name"`
	RevokedSerials []string `json:"revoked_serials"`
	// SessionsClosed is the number of live MQTT connections closed.
	SessionsClosed int `json:"sessions_closed"`
}

// Client is one MQTT session of the broker (GET /v1/admin/clients).
type Client struct {
	ClientID string    `json:"client_id"`
	Identity string    `json:"identity"` // role/name
	Online   bool      `json:"online"`
	Remote   string    `json:"remote,omitempty"`
	Since    time.Time `json:"since,omitzero"`
	// Subscriptions are the session's topic filters, sorted.
	Subscriptions []string `json:"subscriptions"`
	// Queued is the number of messages waiting for the client (in flight
	// or queued while offline).
	Queued int `json:"queued"`
}

// DisconnectResponse reports a disconnect.
type DisconnectResponse struct {
	ClientID string `json:"client_id"`
	// WasOnline: the client had a live connection, now closed.
	WasOnline bool `json:"was_online"`
}

// Retained is one retained message (GET /v1/admin/retained?filter=).
type Retained struct {
	Topic     string `json:"topic"`
	QoS       byte   `json:"qos"`
	Size      int    `json:"size"`
	Publisher string `json:"publisher,omitempty"`
	// Payload is the first bytes of the payload (at most 256).
	Payload []byte `json:"payload,omitempty"`
}

// RetainedDeleteResponse reports DELETE /v1/admin/retained?topic=.
type RetainedDeleteResponse struct {
	Deleted int `json:"deleted"`
}

// PolicyShowResponse is the policy in force (GET /v1/admin/policy).
type PolicyShowResponse struct {
	File      string `json:"file"`
	FileRules int    `json:"file_rules"`
	Rules     int    `json:"rules"`
	// YAML is the policy file's text (the built-in default's when no file).
	YAML string `json:"yaml"`
}

// GroupActionResponse reports a revoke, suspend or resume of a group.
type GroupActionResponse struct {
	Group   string                `json:"group"`
	Devices []StateChangeResponse `json:"devices"`
	// SessionsClosed counts the devices whose live session was closed.
	SessionsClosed int `json:"sessions_closed"`
}
