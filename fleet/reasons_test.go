package fleet

import "testing"

// The reasons are wire codes and metric label values: they never change.
func TestReasonStringsAreStable(t *testing.T) {
	for r, want := range map[Reason]string{
		ReasonNoCert: "no_cert", ReasonNoIdentity: "no_identity", ReasonUnknownSerial: "unknown_serial",
		ReasonRevoked: "revoked", ReasonSuspended: "suspended", ReasonUnknownDevice: "unknown_device",
		ReasonExpired: "expired", ReasonIdentityDiffer: "identity_mismatch", ReasonClientIDDiffer: "client_id_mismatch",
		ReasonWillDenied: "will_denied", ReasonUnknownCA: "unknown_ca", ReasonHelloTimeout: "hello_timeout",
		ReasonPendingLimit: "pending_limit", ReasonPendingPerIP: "pending_per_ip", ReasonPendingEvicted: "pending_evicted",
		ReasonClientCertUnknown: "client_cert_unknown", ReasonOperatorRequired: "operator_required",
		ReasonTokenUnknown: "token_unknown", ReasonTokenDevice: "token_device_mismatch", ReasonInvalidState: "invalid_state",
		ReasonEKRegistrationMoved: "ek_registration_changed", ReasonInternal: "internal",
		ReasonStoreUnavailable: "store_unavailable",
	} {
		if string(r) != want {
			t.Errorf("%q, want %q", r, want)
		}
	}
}

// The operator API names the directory's refusals with its own codes.
func TestClientCertCode(t *testing.T) {
	for r, want := range map[Reason]Reason{
		ReasonNoCert:         "client_cert_required",
		ReasonNoIdentity:     "client_cert_identity",
		ReasonIdentityDiffer: "client_cert_identity",
		ReasonUnknownSerial:  "client_cert_unknown",
		ReasonRevoked:        "client_cert_revoked",
		ReasonExpired:        "client_cert_invalid",
		ReasonSuspended:      "operator_required",
		ReasonUnknownDevice:  "operator_required",
	} {
		if got := r.ClientCertCode(); got != want {
			t.Errorf("%s: %s, want %s", r, got, want)
		}
	}
}
