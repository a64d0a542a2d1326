package api

import "time"

// PathAdminDiagnose runs the broker's own checks on a certificate
// (operator mTLS): `fleetgate diagnose`.
const PathAdminDiagnose = "/v1/admin/diagnose"

// DiagnoseRequest asks why the broker would refuse a certificate: either
// the chain a device presents (ChainPEM), or a device's current
// certificate from the registry (DeviceID alone). The private key never
// travels: the CLI checks it locally.
type DiagnoseRequest struct {
	// ChainPEM is the device's certificate, then any CA certificates it
	// sends with it, as PEM.
	ChainPEM string `json:"chain_pem,omitempty"`
	// DeviceID is the device the certificate should be (with ChainPEM),
	// or the device whose current certificate to check (alone).
	DeviceID string `json:"device_id,omitempty"`
	// ClientID is the MQTT client ID the device connects with (default:
	// its identity's name).
	ClientID string `json:"client_id,omitempty"`
}

// DiagnoseCheck is one check of the broker, in the order it runs them.
type DiagnoseCheck struct {
	Name   string `json:"name"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// DiagnoseReport is the broker's verdict on a certificate and why.
type DiagnoseReport struct {
	// Accepted: the broker would accept the connection.
	Accepted bool `json:"accepted"`
	// Reason is the broker's refusal reason, as it logs it and labels
	// fleetgate_broker_auth_failures_total (fleet.Reason).
	Reason string `json:"reason,omitempty"`
	// Problem is the finer cause (chain_incomplete, issuer_untrusted,
	// issuer_other_key, issuer_is_root, not_yet_valid, expired, wrong_eku,
	// no_identity, other_device, client_id, unknown_serial,
	// identity_mismatch, cert_revoked, device_revoked, device_suspended,
	// unknown_device, key_algorithm, not_enrolled).
	Problem string `json:"problem,omitempty"`
	// Summary says it in one plain sentence, with what to do.
	Summary    string          `json:"summary"`
	Checks     []DiagnoseCheck `json:"checks"`
	Identity   string          `json:"identity,omitempty"`
	Subject    string          `json:"subject,omitempty"`
	Issuer     string          `json:"issuer,omitempty"`
	Serial     string          `json:"serial,omitempty"`
	KeyAlg     string          `json:"key_algorithm,omitempty"`
	NotBefore  time.Time       `json:"not_before,omitzero"`
	NotAfter   time.Time       `json:"not_after,omitzero"`
	ServerTime time.Time       `json:"server_time"`
	// ClientCAs are the subjects of the CAs the broker accepts device
	// certificates from.
	ClientCAs []string `json:"client_cas,omitempty"`
}
