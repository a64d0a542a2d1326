package fleet

// Reason names one condition under which fleetgate refuses something: a
// connection (broker), a request (enrollment and operator APIs). It is the
// one vocabulary of refusals: the broker logs it and labels
// fleetgate_broker_auth_failures_total with it, the APIs send it as their
// error code and audit it. The string values are part of the wire format
// and of the metrics: they never change.
type Reason string

// Refusals of a client certificate by the directory (directory.Verify), as
// the broker names them in logs and metric labels.
const (
	ReasonNoCert         Reason = "no_cert"
	ReasonNoIdentity     Reason = "no_identity"
	ReasonUnknownSerial  Reason = "unknown_serial"
	ReasonRevoked        Reason = "revoked"
	ReasonSuspended      Reason = "suspended"
	ReasonUnknownDevice  Reason = "unknown_device"
	ReasonExpired        Reason = "expired"
	ReasonIdentityDiffer Reason = "identity_mismatch"
	// A cluster node whose view of revocations is older than its bound
	// refuses every certificate until it has caught up (docs/cluster.md).
	ReasonDirectoryStale Reason = "directory_stale"
	// Refusals at CONNECT that are the broker's own.
	ReasonClientIDDiffer Reason = "client_id_mismatch"
	ReasonWillDenied     Reason = "will_denied"
)

// Refusals of a client certificate by the operator API, as its error codes
// name them (ClientCertCode maps the directory's reasons to these).
const (
	ReasonClientCertRequired Reason = "client_cert_required"
	ReasonClientCertInvalid  Reason = "client_cert_invalid"
	ReasonClientCertIdentity Reason = "client_cert_identity"
	ReasonClientCertUnknown  Reason = "client_cert_unknown"
	ReasonClientCertRevoked  Reason = "client_cert_revoked"
	ReasonOperatorRequired   Reason = "operator_required"
)

// ClientCertCode is the operator API's error code for a refusal of the
// directory (directory.Verify): the API names the same conditions with a
// client_cert_ prefix. Device conditions (suspended, unknown device) never
// reach it for an operator certificate; they map to operator_required, the
// answer any non-operator certificate gets.
func (r Reason) ClientCertCode() Reason {
	switch r {
	case ReasonNoCert:
		return ReasonClientCertRequired
	case ReasonUnknownSerial:
		return ReasonClientCertUnknown
	case ReasonRevoked:
		return ReasonClientCertRevoked
	case ReasonExpired:
		return ReasonClientCertInvalid
	case ReasonNoIdentity, ReasonIdentityDiffer:
		return ReasonClientCertIdentity
	case ReasonDirectoryStale:
		return ReasonDirectoryStale
	}
	return ReasonOperatorRequired
}

// Refusals of the enrollment API and the registry's conditions, as the API
// names them in its error codes and audit records.
const (
	ReasonTokenInvalid        Reason = "token_invalid"
	ReasonTokenUnknown        Reason = "token_unknown"
	ReasonTokenExpired        Reason = "token_expired"
	ReasonTokenUsed           Reason = "token_used"
	ReasonTokenDevice         Reason = "token_device_mismatch"
	ReasonDeviceRevoked       Reason = "device_revoked"
	ReasonDeviceSuspended     Reason = "device_suspended"
	ReasonDeviceTPMBound      Reason = "device_tpm_bound"
	ReasonNotFound            Reason = "not_found"
	ReasonConflict            Reason = "conflict"
	ReasonNameTaken           Reason = "name_taken"
	ReasonRenewalRefused      Reason = "renewal_refused"
	ReasonInvalidState        Reason = "invalid_state"
	ReasonEKNotRegistered     Reason = "ek_not_registered"
	ReasonEKRegistrationMoved Reason = "ek_registration_changed"
	ReasonEKRegistered        Reason = "ek_already_registered"
	ReasonDeviceHasEK         Reason = "device_has_ek"
	ReasonDuplicateEntry      Reason = "duplicate_entry"
	ReasonDeviceIDMismatch    Reason = "device_id_mismatch"
	ReasonInternal            Reason = "internal"
	// ReasonStoreUnavailable: the registry's store did not answer (a
	// cluster without quorum); 503 with Retry-After, nothing written.
	ReasonStoreUnavailable Reason = "store_unavailable"
)

// Refusals of a connection by the broker's listener, before the directory
// is asked (the TLS handshake, admission under load), as the broker names
// them in logs and in the labels of fleetgate_broker_auth_failures_total
// (the pending_* ones also in fleetgate_broker_limit_hits_total).
const (
	ReasonUnknownCA          Reason = "unknown_ca"
	ReasonWrongKeyUsage      Reason = "wrong_key_usage"
	ReasonInvalidCert        Reason = "invalid_cert"
	ReasonHandshakeTimeout   Reason = "handshake_timeout"
	ReasonHelloTimeout       Reason = "hello_timeout"
	ReasonNotTLS             Reason = "not_tls"
	ReasonHandshakeFailed    Reason = "handshake_failed"
	ReasonPendingLimit       Reason = "pending_limit"
	ReasonPendingPerIP       Reason = "pending_per_ip"
	ReasonPendingEvicted     Reason = "pending_evicted"
	ReasonPendingPerIdentity Reason = "pending_per_identity"
)
