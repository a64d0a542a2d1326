package api

import "time"

// Issuing-CA rotation (docs/pki.md).
const (
	// PathCAIssuers (GET, no client certificate) lists the current and
	// the trusted issuing CAs: a device whose chain's issuer is not the
	// current one renews early.
	PathCAIssuers = "/v1/ca/issuers"
	// PathCRLIssuer + {id} is the CRL of one trusted issuing CA.
	PathCRLIssuer      = "/v1/crl/"
	PathAdminCA        = "/v1/admin/ca"
	PathAdminCARotate  = "/v1/admin/ca/rotate"
	PathAdminCAImport  = "/v1/admin/ca/import"
	PathAdminCARetire  = "/v1/admin/ca/retire"
	ReasonCAInUse      = "ca_in_use"
	ReasonBadIssuingCA = "bad_issuing_ca"
)

// CAIssuer is one issuing CA as the admin API shows it.
type CAIssuer struct {
	ID        string    `json:"id"`
	State     string    `json:"state"`
	Subject   string    `json:"subject,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	Added     time.Time `json:"added,omitzero"`
	Retired   time.Time `json:"retired,omitzero"`
	// ActiveDevices counts the active devices holding an unexpired,
	// unrevoked certificate of this CA; Principals the services and
	// operators.
	ActiveDevices  int    `json:"active_devices"`
	Principals     int    `json:"principals"`
	CertificatePEM string `json:"certificate_pem,omitempty"`
	// CSRPEM is the request of a pending CA, for the offline root to sign.
	CSRPEM string `json:"csr_pem,omitempty"`
}

// CAStatus answers GET PathAdminCA.
type CAStatus struct {
	Root string `json:"root"`
	// RootKeyOnline: the root key is in the data directory (rotation signs
	// by itself); otherwise rotation yields a CSR for the offline root.
	RootKeyOnline bool       `json:"root_key_online"`
	Current       string     `json:"current"`
	Issuers       []CAIssuer `json:"issuers"`
}

// CAChangeResponse answers rotate and import: the new issuing CA (pending,
// with its CSR, when the root is offline) and what was re-issued.
type CAChangeResponse struct {
	Issuer           CAIssuer `json:"issuer"`
	ServerReissued   bool     `json:"server_reissued"`
	OperatorReissued bool     `json:"operator_reissued"`
}

// CAImportRequest carries an issuing CA certificate signed by the root.
type CAImportRequest struct {
	CertificatePEM string `json:"certificate_pem"`
}

// CARetireRequest retires an issuing CA; Force retires it although active
// devices still hold its certificates.
type CARetireRequest struct {
	ID    string `json:"id"`
	Force bool   `json:"force,omitempty"`
}

// CARetireResponse answers a retirement.
type CARetireResponse struct {
	Issuer         CAIssuer `json:"issuer"`
	SessionsClosed int      `json:"sessions_closed"`
}

// CAIssuersResponse answers GET PathCAIssuers.
type CAIssuersResponse struct {
	Current string           `json:"current"`
	Trusted []CAIssuerPublic `json:"trusted"`
}

// CAIssuerPublic is a trusted issuing CA as devices see it.
type CAIssuerPublic struct {
	ID             string `json:"id"`
	CertificatePEM string `json:"certificate_pem"`
	CRL            string `json:"crl"`
}
