package enroll

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// TPM enrollment (docs/enrollment-protocol.md, "The protocol"): two round trips.
//
// Round 1, POST /v1/enroll/tpm/challenge: chain, then registration and
// device state, then the AK; the server encrypts a fresh secret to the EK
// public key taken from the verified EK certificate (never a key the device
// merely claims) for the AK's name, and keeps a single-use, expiring
// challenge.
//
// Round 2, POST /v1/enroll/tpm/complete: the challenge is taken (single use,
// whatever the outcome), the activated secret compared in constant time,
// then the certification of the TLS key by the AK (VerifyCertify), the CSR,
// and only then is the certificate signed and recorded (registry.RedeemTPM,
// one transaction that re-checks the device state) and returned.
//
// Re-enrollment policy: a device may enroll again (after a factory reset of
// its TLS key, or to get a new key) when it attests with the EK registered
// for it and is neither revoked nor suspended. Its earlier certificates stay
// valid until they expire unless an operator revokes them; the registry's
// current serial is the newest.
//
// Policy TPMPolicyAllowlist: the EK must be registered (and, when TPMRoots
// are configured, its certificate must also chain to one of them).
// TPMPolicyManufacturer: the EK certificate must chain to TPMRoots; an
// unregistered EK gets the device ID api.AutoDeviceID and group "default".

// tpmEnroller serves the TPM enrollment and EK registration endpoints.
type tpmEnroller struct {
	s          *Server
	challenges *challengeStore
	// ekCerts verifies EK certificates against TPMRoots (nil without
	// roots), remembering those that verified (attest.EKCache).
	ekCerts *attest.EKCache
	// latency is the handlers' own timing, by phase and outcome.
	latency *prometheus.HistogramVec
}

// TPM enrollment phases (metric label).
const (
	phaseChallenge = "challenge"
	phaseComplete  = "complete"
)

// registerTPMRoutes registers the TPM attestation enrollment endpoints (the
// manufacturing registration endpoints are the operator API's).
func (s *Server) registerTPMRoutes() {
	t := newTPMEnroller(s)
	s.tpm = t
	if s.cfg.Metrics != nil {
		if err := s.cfg.Metrics.Register(t.latency); err != nil {
			s.log.Warn("TPM enrollment latency metric not registered", logKeyErr, err)
		}
	}
	s.mux.HandleFunc("POST "+api.PathTPMChallenge, t.handleChallenge)
	s.mux.HandleFunc("POST "+api.PathTPMComplete, t.handleComplete)
}

func newTPMEnroller(s *Server) *tpmEnroller {
	var ekCerts *attest.EKCache
	if s.cfg.TPMRoots != nil {
		ekCerts = attest.NewEKCache(s.cfg.TPMRoots, nil, attest.DefaultEKCacheSize)
	}
	return &tpmEnroller{
		s:          s,
		challenges: newChallengeStore(s.cfg.Now, s.cfg.Rand, s.cfg.ChallengeTTL, DefaultMaxChallenges),
		ekCerts:    ekCerts,
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fleetgate_tpm_enroll_seconds",
			Help:    "Server-side time of TPM enrollment requests, by phase (challenge, complete) and outcome (ok, denied).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"phase", "outcome"}),
	}
}

func (t *tpmEnroller) observe(phase string, start time.Time, err error) {
	out := "ok"
	if err != nil {
		out = "denied"
	}
	t.latency.WithLabelValues(phase, out).Observe(time.Since(start).Seconds())
}

// ekCheck is the outcome of the EK checks of round 1.
type ekCheck struct {
	cert         *x509.Certificate
	fp           string
	deviceID     string
	group        string
	autoRegister bool
}

// checkEK verifies the EK certificate (chain when roots are configured,
// through ekCerts: attest.VerifyEKCertificate, answered from its cache for
// the same certificate bytes while the chain is valid), the registration
// according to policy, and the device state.
func (t *tpmEnroller) checkEK(ekDER []byte, claimedID string) (*ekCheck, error) {
	cfg := t.s.cfg
	var cert *x509.Certificate
	var err error
	if t.ekCerts != nil {
		cert, err = t.ekCerts.Verify(ekDER, cfg.Now())
	} else {
		cert, err = parseEKCert(ekDER)
	}
	if err != nil {
		return nil, attestError(err)
	}
	if _, err := cfg.TPMDenyList.CheckEK(cert); err != nil {
		return nil, attestError(err)
	}
	c := &ekCheck{cert: cert, fp: api.EKFingerprint(cert.RawSubjectPublicKeyInfo)}
	rec, dev, err := cfg.Registry.DeviceByEK(c.fp)
	switch {
	case err == nil:
		c.deviceID, c.group = rec.DeviceID, rec.Group
		switch dev.State {
		case fleet.StateRevoked:
			return c, apiErr(http.StatusForbidden, fleet.ReasonDeviceRevoked, "device is revoked", registry.ErrDeviceRevoked)
		case fleet.StateSuspended:
			return c, apiErr(http.StatusForbidden, fleet.ReasonDeviceSuspended, "device is suspended", registry.ErrDeviceSuspended)
		}
	case errors.Is(err, registry.ErrEKNotRegistered) && cfg.TPMPolicy == TPMPolicyManufacturer:
		// The chain was verified: TPMRoots is required by this policy.
		c.deviceID, c.group, c.autoRegister = api.AutoDeviceID(cert.RawSubjectPublicKeyInfo), "default", true
		if st, ok := cfg.Registry.DeviceStatus(c.deviceID); ok && (st.State == fleet.StateRevoked || st.State == fleet.StateSuspended) {
			return c, registryError(stateErr(st.State))
		}
	case errors.Is(err, registry.ErrEKNotRegistered):
		return c, apiErr(http.StatusForbidden, fleet.ReasonEKNotRegistered, "this TPM's endorsement key is not registered", err)
	default:
		return c, registryError(err)
	}
	if claimedID != "" && claimedID != c.deviceID {
		return c, apiErr(http.StatusForbidden, fleet.ReasonDeviceIDMismatch, fmt.Sprintf("this TPM is registered as another device (the request named %q)", claimedID), registry.ErrEKDeviceMismatch)
	}
	return c, nil
}

func stateErr(s fleet.DeviceState) error {
	if s == fleet.StateRevoked {
		return registry.ErrDeviceRevoked
	}
	return registry.ErrDeviceSuspended
}

// parseEKCert parses an EK certificate without a chain (allowlist policy
// without manufacturer roots: the registration is the trust) and checks
// everything but the chain (attest.ParseEKCertificate): it is an EK
// certificate by the TCG profile and its key has an EK template.
func parseEKCert(der []byte) (*x509.Certificate, error) {
	cert, _, err := attest.ParseEKCertificate(der)
	return cert, err
}

func (t *tpmEnroller) handleChallenge(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req api.TPMChallengeRequest
	// deviceID names the device in the audit log only once the EK is
	// known: a claimed ID is not attributed to a device.
	deviceID := ""
	resp, err := func() (*api.TPMChallengeResponse, error) {
		if err := decodeJSON(r, &req); err != nil {
			return nil, err
		}
		if req.DeviceID != "" {
			if err := identity.ValidateName(req.DeviceID); err != nil {
				return nil, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err)
			}
		}
		// 1. The TPM is genuine and known.
		ek, err := t.checkEK(req.EKCert, req.DeviceID)
		if ek != nil {
			deviceID = ek.deviceID
		}
		if err != nil {
			return nil, err
		}
		// 2. The AK is a restricted signing key; only the TPM holding the
		// EK and an object of the AK's name can activate the credential.
		ak, err := attest.VerifyAK(req.AKPublic)
		if err != nil {
			return nil, attestError(err)
		}
		ekPub, err := attest.EKPublicFromCert(ek.cert)
		if err != nil {
			return nil, attestError(err)
		}
		credBlob, encSecret, secret, err := attest.MakeCredential(t.s.cfg.Rand, ekPub, ak.Name)
		if err != nil {
			return nil, attestError(err)
		}
		nonce := make([]byte, 32)
		if _, err := io.ReadFull(t.s.cfg.Rand, nonce); err != nil {
			return nil, fmt.Errorf("enroll: nonce: %w", err)
		}
		c := &challenge{secret: secret, nonce: nonce, ekFP: ek.fp, deviceID: ek.deviceID, group: ek.group,
			autoRegister: ek.autoRegister, ak: ak, ekPub: ekPub}
		if t.s.cfg.TPMDenyList != nil {
			// checkEK verified the profile, so the identification parses.
			if c.tpm, err = attest.EKTPMInfo(ek.cert); err != nil {
				return nil, attestError(err)
			}
		}
		if err := t.challenges.put(c); err != nil {
			if errors.Is(err, errChallengesFull) {
				return nil, apiErr(http.StatusServiceUnavailable, "challenge_capacity", "too many enrollments in progress; retry later", err)
			}
			return nil, err
		}
		return &api.TPMChallengeResponse{ChallengeID: c.id, CredentialBlob: credBlob, EncryptedSecret: encSecret,
			Nonce: nonce, ExpiresAt: c.expires}, nil
	}()
	t.observe(phaseChallenge, start, err)
	if err != nil {
		t.s.finish(w, r, "tpm", "enroll.tpm.challenge", deviceID, nil, err)
		return
	}
	t.s.log.Debug("TPM challenge issued", logKeyDevice, deviceID, logKeyRemote, r.RemoteAddr)
	writeJSON(w, http.StatusOK, resp)
}

func (t *tpmEnroller) handleComplete(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	var req api.TPMCompleteRequest
	deviceID := ""
	resp, err := func() (*api.EnrollResponse, error) {
		body := bufferBody(r, api.MaxBodyBytes)
		if err := decodeJSON(r, &req); err != nil {
			// A refused body still consumes the challenge it names, as a
			// wrong secret would: no second attempt on the same one.
			for _, id := range challengeIDsIn(body) {
				if c := t.challenges.discard(id); c != nil && deviceID == "" {
					deviceID = c.deviceID
				}
			}
			return nil, err
		}
		c, err := t.challenges.take(req.ChallengeID, req.Secret)
		if c != nil {
			deviceID = c.deviceID
		}
		switch {
		case errors.Is(err, errChallengeUnknown):
			return nil, apiErr(http.StatusUnauthorized, "challenge_unknown", "unknown or already used challenge; start over", err)
		case errors.Is(err, errChallengeExpired):
			return nil, apiErr(http.StatusUnauthorized, "challenge_expired", "challenge expired; start over", err)
		case errors.Is(err, errWrongSecret):
			return nil, apiErr(http.StatusUnauthorized, "wrong_secret", "activated credential secret is wrong; start over", err)
		case err != nil:
			return nil, err
		}
		// 3. The TLS key lives in the same TPM, cannot leave it, and is
		// the CSR's key. The CSR signature is checked by CheckCSR first:
		// VerifyCertify compares its key.
		csr, err := ca.CheckCSR(req.CSR)
		if err != nil {
			return nil, csrError(err)
		}
		if err := c.ak.VerifyCertify(req.TLSPublic, req.CertifyInfo, req.CertifySignature, c.nonce, csr.PublicKey); err != nil {
			return nil, attestError(err)
		}
		// The firmware running now, as the TPM signed it into the
		// certification (the EK certificate's version, judged at round 1,
		// is the firmware at manufacture). Only an AK in the endorsement
		// hierarchy gets the true version: elsewhere the TPM obfuscates
		// it, and it is not judged. Without a deny-list there is nothing
		// to judge it against (CheckFirmware of a nil list accepts all),
		// so the attestation is not decoded again nor the EK's name
		// computed.
		if t.s.cfg.TPMDenyList != nil {
			fw, inEndorsement, err := c.ak.CertifiedFirmwareVersion(req.CertifyInfo, c.ekPub)
			if err != nil {
				return nil, attestError(err)
			}
			if inEndorsement {
				if _, err := t.s.cfg.TPMDenyList.CheckFirmware(c.tpm, fw); err != nil {
					return nil, attestError(err)
				}
			}
		}
		id := identity.Identity{Role: identity.RoleDevice, Name: c.deviceID}
		var cert *x509.Certificate
		rec, err := t.s.cfg.Registry.RedeemTPM(registry.TPMRedemption{
			EKFingerprint: c.ekFP, DeviceID: c.deviceID, AutoRegister: c.autoRegister, Group: c.group,
			Audit: t.s.issuedAudit(r, "enroll.tpm", c.deviceID),
		}, func(fleet.Device) (*fleet.Certificate, error) {
			var err error
			cert, err = t.s.cfg.CA.Issue(id, csr.PublicKey, t.s.cfg.DeviceCertTTL)
			if err != nil {
				return nil, err
			}
			return certRecord(cert, id), nil
		})
		if err != nil {
			return nil, tpmRegistryError(err)
		}
		return t.s.enrollResponse(c.deviceID, cert, rec), nil
	}()
	t.observe(phaseComplete, start, err)
	if err != nil {
		t.s.finish(w, r, "tpm", "enroll.tpm", deviceID, nil, err)
		return
	}
	t.s.finishAudited(w, r, "tpm", "enroll.tpm", deviceID, resp, nil)
}

// attestError maps a verification failure to its API error: one code per
// failed check.
func attestError(err error) error {
	type m struct {
		sentinel error
		code     fleet.Reason
		msg      string
	}
	// Order matters where an error wraps two sentinels: an exportable AK
	// wraps ErrAKAttributes and ErrKeyExportable.
	for _, x := range []m{
		{attest.ErrEKKeyUsage, "ek_key_usage", "certificate is not an EK certificate: its key usage is not an endorsement key's"},
		{attest.ErrEKSAN, "ek_san_invalid", "certificate is not an EK certificate: its subjectAltName is not the TCG TPM identification"},
		{attest.ErrEKEKU, "ek_eku_invalid", "certificate is not an EK certificate: its extended key usage is not tcg-kp-EKCertificate"},
		{attest.ErrEKROCA, "ek_roca", "this TPM's RSA endorsement key is ROCA-vulnerable (CVE-2017-15361)"},
		{attest.ErrEKDenied, "ek_denied", "this TPM model or firmware is on the operator's deny-list"},
		{attest.ErrFirmwareDenied, "tpm_firmware_denied", "the firmware this TPM runs (as it signed it) is on the operator's deny-list"},
		{attest.ErrEKChainInvalid, "ek_chain_invalid", "EK certificate does not chain to a trusted TPM manufacturer"},
	} {
		if errors.Is(err, x.sentinel) {
			return apiErr(http.StatusForbidden, x.code, x.msg, err)
		}
	}
	for _, x := range []m{
		{attest.ErrEKCertMalformed, "ek_cert_malformed", "EK certificate does not parse (DER X.509, at most 16 KiB)"},
		{attest.ErrAKPolicy, "ak_policy", "attestation key must be usable with its auth value only (no authPolicy, no adminWithPolicy)"},
		{attest.ErrKeyPolicy, "key_policy", "TLS key must be usable with its auth value only (no authPolicy, no adminWithPolicy)"},
		{attest.ErrCertifyQualifiedName, "certify_qualified_name", "certified key is not a child key in the TPM's storage hierarchy"},
		{attest.ErrAKNotRestricted, "ak_not_restricted", "attestation key is not a restricted signing key"},
		{attest.ErrAKAttributes, "ak_attributes", "attestation key must be a signing-only key generated in and bound to the TPM"},
		{attest.ErrKeyExportable, "key_exportable", "TLS key can exist outside the TPM (not fixedTPM, fixedParent, sensitiveDataOrigin)"},
		{attest.ErrKeyAttributes, "key_attributes", "TLS key must be a non-restricted signing-only key"},
		{attest.ErrCertifySignature, "certify_signature_invalid", "certification is not signed by the attestation key"},
		{attest.ErrAttestType, "attest_type", "attestation is not a TPM2_Certify certification"},
		{attest.ErrNonceMismatch, "nonce_mismatch", "certification does not carry this challenge's nonce"},
		{attest.ErrCertifyNameMismatch, "certify_name_mismatch", "certified key is not the presented TLS key"},
		{attest.ErrCSRKeyMismatch, "csr_key_mismatch", "CSR is not for the certified TPM key"},
		{attest.ErrKeyType, "key_type", "key type, curve, scheme or name algorithm not supported"},
		{attest.ErrMalformed, "attestation_malformed", "attestation structure does not decode"},
	} {
		if errors.Is(err, x.sentinel) {
			return apiErr(http.StatusBadRequest, x.code, x.msg, err)
		}
	}
	return err
}

func tpmRegistryError(err error) error {
	switch {
	case errors.Is(err, registry.ErrEKNotRegistered):
		return apiErr(http.StatusForbidden, fleet.ReasonEKNotRegistered, "this TPM's endorsement key is not registered", err)
	case errors.Is(err, registry.ErrEKDeviceMismatch), errors.Is(err, registry.ErrDeviceHasEK):
		return apiErr(http.StatusConflict, fleet.ReasonEKRegistrationMoved, "the EK registration changed during enrollment; start over", err)
	}
	return registryError(err)
}

// ---- manufacturing registration (admin) ----

// checkRegistration validates one registration request: device ID, group,
// and the EK certificate (chained to TPMRoots when configured).
func (t *tpmEnroller) checkRegistration(req *api.EKRegisterRequest) (registry.EKRegistration, error) {
	if err := identity.ValidateName(req.DeviceID); err != nil {
		return registry.EKRegistration{}, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err)
	}
	if req.Group == "" {
		req.Group = "default"
	}
	if err := identity.ValidateName(req.Group); err != nil {
		return registry.EKRegistration{}, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err)
	}
	var cert *x509.Certificate
	var err error
	if t.s.cfg.TPMRoots != nil {
		cert, err = attest.VerifyEKCertificate(req.EKCert, t.s.cfg.TPMRoots, t.s.cfg.Now())
	} else {
		cert, err = parseEKCert(req.EKCert)
	}
	if err != nil {
		return registry.EKRegistration{}, attestError(err)
	}
	if _, err := t.s.cfg.TPMDenyList.CheckEK(cert); err != nil {
		return registry.EKRegistration{}, attestError(err)
	}
	return registry.EKRegistration{Fingerprint: api.EKFingerprint(cert.RawSubjectPublicKeyInfo), DeviceID: req.DeviceID, Group: req.Group}, nil
}

func registrationError(err error) error {
	switch {
	case errors.Is(err, registry.ErrEKRegistered):
		return apiErr(http.StatusConflict, fleet.ReasonEKRegistered, "this EK is registered for another device", err)
	case errors.Is(err, registry.ErrDeviceHasEK):
		return apiErr(http.StatusConflict, fleet.ReasonDeviceHasEK, "this device is bound to another EK", err)
	case errors.Is(err, registry.ErrDuplicateInImport):
		return apiErr(http.StatusConflict, fleet.ReasonDuplicateEntry, "the import names this EK or device twice", err)
	}
	return registryError(err)
}

// problemMessage is the public message of an import problem, with the
// cause for operator-facing detail (the admin API is operator-only).
func problemMessage(e *Error) string {
	if e.Err != nil && e.Status < 500 {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

// decodeJSONLimit is decodeJSON with a larger body limit (imports).
func decodeJSONLimit(r *http.Request, v any, limit int64) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return apiErr(http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type must be application/json", nil)
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, limit))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return apiErr(http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("request body exceeds %d bytes", limit), err)
		}
		return apiErr(http.StatusBadRequest, "malformed_json", "request body is not valid JSON for this endpoint: "+err.Error(), err)
	}
	if dec.More() {
		return apiErr(http.StatusBadRequest, "malformed_json", "request body has trailing data", nil)
	}
	return nil
}

// bufferBody reads up to limit bytes of r's body, replaces the body with
// what was read (followed by the read error, e.g. *http.MaxBytesError, so
// that decodeJSON reports it as before) and returns the bytes.
func bufferBody(r *http.Request, limit int64) []byte {
	b, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	rd := io.Reader(bytes.NewReader(b))
	if err != nil {
		rd = io.MultiReader(rd, errReader{err})
	}
	r.Body = io.NopCloser(rd)
	if int64(len(b)) > limit {
		b = b[:limit]
	}
	return b
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// maxChallengeIDsInBody bounds how many challenge IDs one refused body can
// consume: the last ones, since encoding/json keeps the last duplicate.
const maxChallengeIDsInBody = 16

// challengeIDsIn returns the challenge IDs a refused round-2 body may name,
// so that a body that is refused (malformed, unknown fields, bad base64,
// trailing data) still consumes the challenge it was for. The key is
// matched as encoding/json matches it into api.TPMCompleteRequest: any
// case ("CHALLENGE_ID"), and the last of duplicates wins. So the ID json
// would decode comes first (a decode into a one-field struct, which
// ignores the other fields and their errors), then every top-level member
// whose key folds to "challenge_id", read token by token up to the first
// syntax error, keeping the last maxChallengeIDsInBody (decoys written
// before the real one cannot push it out).
func challengeIDsIn(body []byte) []string {
	var ids []string
	var one struct {
		ChallengeID string `json:"challenge_id"`
	}
	if json.Unmarshal(body, &one) == nil && one.ChallengeID != "" {
		ids = append(ids, one.ChallengeID)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return ids
	}
	var scanned []string
	for dec.More() {
		key, err := dec.Token()
		if err != nil {
			break
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			break
		}
		var id string
		if k, ok := key.(string); ok && strings.EqualFold(k, "challenge_id") && json.Unmarshal(v, &id) == nil && id != "" {
			if len(scanned) == maxChallengeIDsInBody {
				scanned = scanned[1:]
			}
			scanned = append(scanned, id)
		}
	}
	for _, id := range slices.Backward(scanned) {
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	return ids
}

// EKRefusalCode is the API error code the server answers for an error of
// the EK checks (attest.VerifyEKCertificate, attest.ParseEKCertificate,
// (*attest.DenyList).CheckEK), "" for nil; `fleetgate tpm check` prints it.
func EKRefusalCode(err error) string {
	if err == nil {
		return ""
	}
	return asAPIError(attestError(err)).Code
}
