package api

// Lifecycle paths (admin API, operator mTLS), renewal and EST.
const (
	// PathAdminDeviceAction is followed by /{id}/revoke, /suspend or /resume.
	PathAdminDeviceAction  = "/v1/admin/devices/"
	PathAdminCertificates  = "/v1/admin/certificates/"
	PathESTCACerts         = "/.well-known/est/cacerts"
	PathESTSimpleEnroll    = "/.well-known/est/simpleenroll"
	PathESTSimpleReenroll  = "/.well-known/est/simplereenroll"
	PathESTCSRAttrs        = "/.well-known/est/csrattrs"
	ContentTypeCSRAttrs    = "application/csrattrs"
	ContentTypePKCS7Certs  = "application/pkcs7-mime; smime-type=certs-only"
	ContentTypePKCS10      = "application/pkcs10"
	ContentTypeCRL         = "application/pkix-crl"
	ContentTypeJSON        = "application/json"
	HeaderTransferEncoding = "Content-Transfer-Encoding"
)

// StateChangeRequest carries the reason of a revoke, suspend or resume.
type StateChangeRequest struct {
	Reason string `json:"reason"`
	// ReasonCode is the CRL reason of a revocation (RFC 5280 names:
	// keyCompromise, cessationOfOperation, superseded, affiliationChanged,
	// privilegeWithdrawn, unspecified). Empty: inferred from Reason
	// ("stolen" is keyCompromise).
	ReasonCode string `json:"reason_code,omitempty"`
}

// StateChangeResponse reports the device's state after the change and the
// certificates revoked by it.
type StateChangeResponse struct {
	DeviceID       string   `json:"device_id,omitempty"`
	State          string   `json:"state,omitempty"`
	RevokedSerials []string `json:"revoked_serials,omitempty"`
	// SessionsClosed is true when the broker in this process closed the
	// device's live sessions before this response was written.
	SessionsClosed bool `json:"sessions_closed"`
	// WasOnline: the device had a live session when the request arrived.
	WasOnline bool `json:"was_online"`
}

// RenewRequest renews the certificate presented over mTLS.
type RenewRequest struct {
	// CSR is a PKCS#10 request (DER) for the same key as the presented
	// certificate.
	CSR []byte `json:"csr"`
}

// PathAdminPolicyReload reloads the broker's policy file (in-process).
const PathAdminPolicyReload = "/v1/admin/policy/reload"

// DeviceUpdateRequest changes a device's attributes
// (PATCH /v1/admin/devices/{id}). Empty group: unchanged; nil tags:
// unchanged; {} clears them.
type DeviceUpdateRequest struct {
	Group string            `json:"group,omitempty"`
	Tags  map[string]string `json:"tags,omitempty"`
}

// PolicyReloadResponse reports a reload: the file now in force, the
// number of rules written in it, and the number of compiled rules (one per
// topic of a rule).
type PolicyReloadResponse struct {
	File      string `json:"file"`
	FileRules int    `json:"file_rules"`
	Rules     int    `json:"rules"`
}
