package enroll

import (
	"crypto/x509"
	"net/http"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// What the operator API (operator/) shares with the enrollment service:
// one error type and its mapping of registry and CSR errors, one refusal
// limiter (a source refused by both APIs has one budget), the CRL, and the
// EK certificate checks of TPM enrollment. The operator's handlers are
// mounted on the enrollment service's listener (HandleFunc).

// HandleFunc mounts h on the service's mux (the operator API shares the
// listener, TLS configuration and paths under /v1/admin/).
func (s *Server) HandleFunc(pattern string, h http.HandlerFunc) { s.mux.HandleFunc(pattern, h) }

// VerifiedClientCert returns the leaf of r's client certificate chain once
// it verifies against the issuing CA, for client authentication, now (the
// TLS configuration only requests client certificates).
func (s *Server) VerifiedClientCert(r *http.Request) (*x509.Certificate, error) {
	return s.verifiedClientCert(r)
}

// NewError returns an API error: status and code for the caller, a public
// message, and the cause that is logged (and audited) but never sent.
func NewError(status int, code fleet.Reason, msg string, cause error) *Error {
	return apiErr(status, code, msg, cause)
}

// AsError maps any error to an *Error; unknown errors become 500s whose
// detail stays in the log.
func AsError(err error) *Error { return asAPIError(err) }

// WriteError logs (unless the refusal limiter suppresses it) and writes e.
func (s *Server) WriteError(w http.ResponseWriter, r *http.Request, e *Error, deviceID string) {
	s.writeError(w, r, e, deviceID)
}

// Refusal reports whether the refusal e of r is audited and logged in full
// (the refusal limiter shared by both APIs).
func (s *Server) Refusal(r *http.Request, e *Error) bool { return s.refusal(r, e) }

// RefreshCRL re-signs the CRL now (after a revocation).
func (s *Server) RefreshCRL() { s.refreshCRL() }

// CheckEKRegistration validates one manufacturing registration: device ID,
// group, the EK certificate (chained to the TPM roots when configured) and
// the TPM deny-list.
func (s *Server) CheckEKRegistration(req *api.EKRegisterRequest) (registry.EKRegistration, error) {
	return s.tpm.checkRegistration(req)
}

// RegistryError maps registry errors to API errors.
func RegistryError(err error) error { return registryError(err) }

// RegistrationError maps EK registration errors to API errors.
func RegistrationError(err error) error { return registrationError(err) }

// CSRError maps CSR check errors to API errors.
func CSRError(err error) error { return csrError(err) }

// CertRecord is the registry record of an issued certificate.
func CertRecord(c *x509.Certificate, id identity.Identity) *fleet.Certificate {
	return certRecord(c, id)
}

// DecodeJSON decodes a JSON request body (api.MaxBodyBytes at most, no
// unknown fields).
func DecodeJSON(r *http.Request, v any) error { return decodeJSON(r, v) }

// DecodeJSONLimit is DecodeJSON with another body limit (imports).
func DecodeJSONLimit(r *http.Request, v any, limit int64) error {
	return decodeJSONLimit(r, v, limit)
}

// WriteJSON writes v as a JSON answer with status.
func WriteJSON(w http.ResponseWriter, status int, v any) { writeJSON(w, status, v) }

// AuditDeviceID keeps only a valid device ID for the audit log.
func AuditDeviceID(id string) string { return auditDeviceID(id) }

// CauseText is the bounded cause of e for a log line or an audit record.
func CauseText(e *Error) string { return causeText(e) }

// ProblemMessage is the public message of an import problem, with the
// cause for operator-facing detail.
func ProblemMessage(e *Error) string { return problemMessage(e) }

// Bounds of peer-chosen text in logs and audit records.
const (
	MaxLoggedCause = maxLoggedCause
	MaxLoggedField = maxLoggedField
)
