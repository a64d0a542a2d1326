// Package api holds the versioned JSON wire types of the fleetgate
// enrollment and admin HTTP APIs. It is shared by the server (enroll) and the
// device side (devicesdk) and imports nothing of either.
//
// Byte fields ([]byte) travel as standard base64 in JSON, as encoding/json
// does by default.
package api

import (
	"encoding/json"
	"fmt"
	"time"
)

// Paths of the v1 API.
const (
	PathEnrollToken   = "/v1/enroll/token"
	PathTPMChallenge  = "/v1/enroll/tpm/challenge"
	PathTPMComplete   = "/v1/enroll/tpm/complete"
	PathRenew         = "/v1/renew"
	PathCACerts       = "/v1/ca"
	PathCRL           = "/v1/crl"
	PathAdminTokens   = "/v1/admin/tokens"
	PathAdminServices = "/v1/admin/services"
	PathAdminDevices  = "/v1/admin/devices"
	PathAdminAudit    = "/v1/admin/audit"
	// PathAdminDevicesRegister registers one TPM EK for a device.
	PathAdminDevicesRegister = "/v1/admin/devices/register"
	// PathAdminDevicesImport registers many EKs, all or nothing.
	PathAdminDevicesImport = "/v1/admin/devices/import"
)

// MaxBodyBytes is the largest request body the server reads.
const MaxBodyBytes = 64 << 10

// TokenEnrollRequest enrolls a device that has no TPM, with a one-time
// bootstrap token minted by an operator.
type TokenEnrollRequest struct {
	// Token is the bootstrap token, as printed by `fleetgate tokens create`.
	Token string `json:"token"`
	// DeviceID must equal the device the token was minted for.
	DeviceID string `json:"device_id"`
	// CSR is a PKCS#10 certificate request, DER, signed by the device key
	// (ECDSA P-256 or P-384, RSA at least 2048 bits).
	CSR []byte `json:"csr"`
}

// EnrollResponse is returned by every successful enrollment or renewal.
type EnrollResponse struct {
	DeviceID string `json:"device_id"`
	// Identity is the URI SAN of the certificate.
	Identity string `json:"identity"`
	// CertificateChainPEM is the leaf followed by the issuing CA.
	CertificateChainPEM string `json:"certificate_chain_pem"`
	// CACertificatesPEM are the roots the device should trust for the
	// broker and the enrollment server.
	CACertificatesPEM string    `json:"ca_certificates_pem"`
	Serial            string    `json:"serial"`
	NotAfter          time.Time `json:"not_after"`
}

// Error is the body of every non-2xx response, and the one error type the
// clients (operator/client, devicesdk) return for such an answer: find it
// with errors.As.
type Error struct {
	// Status is the HTTP status of the answer (not in the body).
	Status int `json:"-"`
	// Code is a stable machine-readable reason, e.g. "token_expired".
	Code string `json:"code"`
	// Message is a human-readable explanation. It never carries secrets.
	Message string `json:"message"`
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message)
}

// ReadError is the error of a non-2xx answer with status and body: the
// body's Error, or the body as the message when it is not one.
func ReadError(status int, body []byte) *Error {
	var e Error
	if json.Unmarshal(body, &e) != nil {
		e.Message = string(body)
	}
	e.Status = status
	return &e
}

// TokenCreateRequest asks for a bootstrap token (admin API, operator mTLS).
type TokenCreateRequest struct {
	DeviceID string        `json:"device_id"`
	Group    string        `json:"group"`
	TTL      time.Duration `json:"ttl"`
}

// TokenCreateResponse carries the token once; the server keeps only its hash.
type TokenCreateResponse struct {
	Token     string    `json:"token"`
	DeviceID  string    `json:"device_id"`
	Group     string    `json:"group"`
	ExpiresAt time.Time `json:"expires_at"`
}

// ServiceIssueRequest asks for a service certificate for a backend consumer.
// The server generates the key unless CSR is set.
type ServiceIssueRequest struct {
	Name string `json:"name"`
	// CSR, if set, is a PKCS#10 request whose key is used (recommended).
	CSR []byte        `json:"csr,omitempty"`
	TTL time.Duration `json:"ttl,omitempty"`
}

// ServiceIssueResponse returns the chain, and the key only when the server
// generated it.
type ServiceIssueResponse struct {
	Identity            string    `json:"identity"`
	CertificateChainPEM string    `json:"certificate_chain_pem"`
	PrivateKeyPEM       string    `json:"private_key_pem,omitempty"`
	CACertificatesPEM   string    `json:"ca_certificates_pem"`
	Serial              string    `json:"serial"`
	NotAfter            time.Time `json:"not_after"`
}

// Device is the registry's view of a device (admin API).
type Device struct {
	ID                string            `json:"id"`
	Group             string            `json:"group"`
	State             string            `json:"state"`
	AttestationMethod string            `json:"attestation_method,omitempty"`
	Serial            string            `json:"serial,omitempty"`
	NotAfter          time.Time         `json:"not_after,omitzero"`
	CreatedAt         time.Time         `json:"created_at"`
	Online            bool              `json:"online"`
	Tags              map[string]string `json:"tags,omitempty"`
}

// AuditPage is one page of the audit log (GET /v1/admin/audit?device=&limit=&cursor=),
// newest first. Next, when not empty, is the cursor of the following
// (older) page.
type AuditPage struct {
	Records []AuditRecord `json:"records"`
	Next    string        `json:"next,omitempty"`
}

// Audit page sizes: DefaultAuditLimit without limit=, at most MaxAuditLimit.
const (
	DefaultAuditLimit = 100
	MaxAuditLimit     = 1000
)

// AuditRecord is one entry of the append-only audit log.
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
