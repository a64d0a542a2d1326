// Package enroll is fleetgate's enrollment service: the HTTPS API through
// which devices obtain certificates (bootstrap token, TPM attestation in
// attest/, EST) and renew them. It verifies, asks ca/ to sign, records in
// registry/ and only then answers. The operator API (operator/) is mounted
// on its listener.
package enroll

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Log keys.
const (
	logKeyDevice = "device"
	logKeyRemote = "remote"
	logKeyCode   = "code"
	logKeyErr    = "err"
	logKeyActor  = "actor"
)

// Config configures a Server.
type Config struct {
	CA       *ca.Authority
	Registry *registry.Registry
	Logger   *slog.Logger
	// Metrics receives the service's collectors; nil: not registered.
	Metrics prometheus.Registerer
	// DeviceCertTTL is the device certificate lifetime (default 90 days).
	DeviceCertTTL time.Duration
	// TPMRoots are the trusted TPM manufacturer roots (EK certificate
	// chains). Nil: only pre-registered EKs can enroll (allowlist).
	TPMRoots *x509.CertPool
	// TPMPolicy is TPMPolicyAllowlist (default: only EKs registered at
	// manufacturing) or TPMPolicyManufacturer (any EK chaining to TPMRoots,
	// with an auto-assigned device ID).
	TPMPolicy string
	// TPMDenyList refuses TPMs by the manufacturer, model and firmware
	// version of their EK certificate (nil: no rules). ROCA-vulnerable RSA
	// EKs are refused in any case.
	TPMDenyList *attest.DenyList
	// ChallengeTTL bounds the time between the two TPM enrollment round
	// trips (default 60s).
	ChallengeTTL time.Duration
	// Now is the clock of challenge expiry and EK chain checks (default:
	// the CA's clock).
	Now func() time.Time
	// Rand is the randomness of challenge IDs, nonces and credential
	// secrets (default crypto/rand).
	Rand io.Reader
	// CRLValidity is the CRL's nextUpdate distance (default 24h); the CRL is
	// re-signed on every revocation and when half of it has passed.
	CRLValidity time.Duration
	// RefusalBurst is how many refusals with the same code from one source
	// address are audited and logged in full per RefusalWindow (default 5),
	// within RefusalGlobal; the rest are counted and summarised in one
	// audit record and one log line per source and window, with a count per
	// code. Metrics count every refusal.
	RefusalBurst int
	// RefusalGlobal bounds the refusals audited and logged in full across
	// all sources: a budget of RefusalGlobal refilled at RefusalGlobal per
	// RefusalWindow (default 100), so at most 2×RefusalGlobal in any
	// window whatever the number of sources.
	RefusalGlobal int
	// RefusalSummaries bounds the summaries written per RefusalWindow the
	// same way (default 100); the summaries over it are merged into one
	// ("N more refusals from M other sources: ...").
	RefusalSummaries int
	// RefusalWindow is the refusal limiter's window (default 1 minute).
	RefusalWindow time.Duration
	// RefusalSources bounds the sources tracked at once (default 4096);
	// beyond it new ones share one entry, "other", counted per code.
	RefusalSources int
}

// Bounds of peer-chosen text in logs and audit records (the registry
// bounds every audit field again).
const (
	maxLoggedCause = 512
	maxLoggedField = 128
)

// TPM enrollment policies.
const (
	TPMPolicyAllowlist    = "allowlist"
	TPMPolicyManufacturer = "manufacturer"
)

// Server serves the enrollment API.
type Server struct {
	cfg     Config
	log     *slog.Logger
	mux     *http.ServeMux
	enrolls *prometheus.CounterVec
	crl     crlCache
	// refusals decides which refusals are audited and logged in full
	// (refusal); the rest are summarised.
	refusals *logguard.Limiter
	// clientCAs is the root of client certificate chains: the issuing CA.
	clientCAs *x509.CertPool
	tpm       *tpmEnroller
	// issuerCRLs caches the CRL of each issuing CA (issuers.go).
	issuerCRLs issuerCRLs
}

// New returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.CA == nil || cfg.Registry == nil {
		return nil, errors.New("enroll: CA and Registry are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DeviceCertTTL <= 0 {
		cfg.DeviceCertTTL = ca.DefaultDeviceLifetime
	}
	if cfg.TPMPolicy == "" {
		cfg.TPMPolicy = TPMPolicyAllowlist
	}
	if cfg.TPMPolicy == TPMPolicyManufacturer && cfg.TPMRoots == nil {
		return nil, errors.New("enroll: TPM policy manufacturer needs TPM manufacturer roots: without them any EK certificate would be accepted")
	}
	if cfg.TPMPolicy != TPMPolicyAllowlist && cfg.TPMPolicy != TPMPolicyManufacturer {
		return nil, fmt.Errorf("enroll: TPM policy %q (want %s or %s)", cfg.TPMPolicy, TPMPolicyAllowlist, TPMPolicyManufacturer)
	}
	if cfg.ChallengeTTL <= 0 {
		cfg.ChallengeTTL = 60 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = cfg.CA.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	s := &Server{cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), clientCAs: cfg.CA.ClientCAs()}
	if cfg.RefusalGlobal <= 0 {
		cfg.RefusalGlobal = 100
	}
	if cfg.RefusalSummaries <= 0 {
		cfg.RefusalSummaries = 100
	}
	s.refusals = logguard.New(logguard.Options{Burst: cfg.RefusalBurst, Global: cfg.RefusalGlobal, Summaries: cfg.RefusalSummaries,
		Window: cfg.RefusalWindow, MaxKeys: cfg.RefusalSources, Report: s.summariseRefusals})
	s.enrolls = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "fleetgate_enrollments_total",
		Help: "Enrollment attempts by method and outcome (ok or the failure code).",
	}, []string{"method", "outcome"})
	if cfg.Metrics != nil {
		if err := cfg.Metrics.Register(s.enrolls); err != nil {
			return nil, fmt.Errorf("enroll: register metrics: %w", err)
		}
	}
	s.mux.HandleFunc("POST "+api.PathEnrollToken, s.handleTokenEnroll)
	s.mux.HandleFunc("GET "+api.PathCACerts, s.handleCACerts)
	s.registerTPMRoutes()
	s.registerLifecycleRoutes()
	s.registerIssuerRoutes()
	return s, nil
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler { return s.mux }

// Run writes the summaries of suppressed refusals every window until ctx
// ends, and then those still open. Without it a summary is written when its
// source is heard from again after the window.
func (s *Server) Run(ctx context.Context) {
	s.refusals.Run(ctx)
	s.refusals.FlushAll()
}

// FlushRefusals writes the summaries of every suppressed refusal now,
// whether or not its window has ended (tests, shutdown).
func (s *Server) FlushRefusals() { s.refusals.FlushAll() }

// refusalSource is the limiter's key of a refusal: its source. An IPv6
// source is its /64: one host usually holds a whole /64, and could
// otherwise take a budget per address. The limiter counts per code inside
// the source's entry (codes are the server's own, a small fixed set).
func refusalSource(r *http.Request) string {
	src := remoteIP(r)
	if ip := net.ParseIP(src); ip != nil && ip.To4() == nil {
		src = ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
	}
	return src
}

// refusal reports whether the refusal e of r is audited and logged in
// full; the answer is kept in e, so that the audit record and the log line
// of one refusal agree and count once.
func (s *Server) refusal(r *http.Request, e *Error) bool {
	if !e.decided {
		e.decided, e.full = true, s.refusals.AllowCode(refusalSource(r), e.Code)
	}
	return e.full
}

// summariseRefusals writes one audit record (batched) and one log line for
// the refusals of a source suppressed in the last window, with the count
// per code: "N more refusals from SRC in the last 1m0s: code a ×n, code b
// ×m". The aggregate of the summaries over budget names the number of
// sources instead ("from M other sources").
func (s *Server) summariseRefusals(sum logguard.Summary) {
	src, remote := sum.Key, sum.Key
	if sum.Key == logguard.AggregateKey {
		src, remote = fmt.Sprintf("%d other sources", sum.Sources), ""
	} else if sum.Key == logguard.OverflowKey {
		src, remote = "other sources (beyond the tracked sources)", ""
	}
	codes := sum.CodesString()
	reason := fmt.Sprintf("%d more refusals from %s in the last %s: %s", sum.Total, src, sum.Window, codes)
	s.cfg.Registry.AuditBatched(registry.AuditRecord{Actor: "fleetgate", Action: "refusals.suppressed", Outcome: registry.OutcomeDenied, Reason: reason, Remote: remote})
	s.log.Warn("refusals suppressed", "source", src, "suppressed", sum.Total, "codes", codes, "window", sum.Window.String())
}

// TLSConfig returns the server's TLS configuration: its certificate, TLS 1.3
// at least... 1.2 for EST clients, and client certificates requested.
//
// A client certificate is verified where it is used, not at the handshake:
// the admin API and renewal require one, and Authenticate verifies its chain
// for them exactly as crypto/tls would (the issuing CA as root, client
// authentication usage, the current time). Enrollment does not use client
// certificates (a device presents its current one out of habit when it
// enrolls again), so verifying them at every handshake was wasted work.
// crypto/tls still checks, at the handshake, the client's CertificateVerify
// signature with the presented certificate's key.
//
// No session tickets: a device enrolls once and renews every few weeks, so
// it never resumes, and each ticket cost the server its encryption and a
// record of its own after every handshake.
func (s *Server) TLSConfig(serverCert tls.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequestClientCert,
		// The CA names sent in the CertificateRequest.
		ClientCAs:              s.clientCAs,
		SessionTicketsDisabled: true,
	}
}

// ---- token enrollment ----

func (s *Server) handleTokenEnroll(w http.ResponseWriter, r *http.Request) {
	var req api.TokenEnrollRequest
	resp, err := func() (*api.EnrollResponse, error) {
		if err := decodeJSON(r, &req); err != nil {
			return nil, err
		}
		return s.enrollToken(req.DeviceID, req.Token, req.CSR, s.issuedAudit(r, "enroll.token", req.DeviceID), nil)
	}()
	s.finishAudited(w, r, "token", "enroll.token", req.DeviceID, resp, err)
}

// enrollToken is token enrollment, shared by the JSON API and EST
// simpleenroll: device ID, token and CSR checks, then redemption, signing,
// recording and the success audit record (audit) in one registry
// transaction. prepare, if not nil, is called with the signed certificate
// inside that transaction: it builds the answer (EST's PKCS#7), and when it
// fails nothing commits, so an answer that cannot be built consumes no
// token.
func (s *Server) enrollToken(deviceID, token string, csrDER []byte, audit *registry.AuditRecord, prepare func(*x509.Certificate) error) (*api.EnrollResponse, error) {
	if err := identity.ValidateName(deviceID); err != nil {
		return nil, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err)
	}
	tokID, secret, err := ParseToken(token)
	if err != nil {
		return nil, apiErr(http.StatusUnauthorized, fleet.ReasonTokenInvalid, "bootstrap token is malformed", err)
	}
	csr, err := ca.CheckCSR(csrDER)
	if err != nil {
		return nil, csrError(err)
	}
	// Device certificates are ECDSA P-256.
	if k, ok := csr.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		return nil, apiErr(http.StatusBadRequest, "csr_key_not_allowed", "device keys must be ECDSA P-256", nil)
	}
	id := identity.Identity{Role: identity.RoleDevice, Name: deviceID}
	var cert *x509.Certificate
	rec, err := s.cfg.Registry.RedeemTokenAudited(tokID, secret, deviceID, audit, func(tr registry.TokenRedemption) (*fleet.Certificate, error) {
		var err error
		cert, err = s.cfg.CA.Issue(id, csr.PublicKey, s.cfg.DeviceCertTTL)
		if err != nil {
			return nil, err
		}
		if prepare != nil {
			if err := prepare(cert); err != nil {
				return nil, err
			}
		}
		return certRecord(cert, id), nil
	})
	if err != nil {
		return nil, registryError(err)
	}
	return s.enrollResponse(deviceID, cert, rec), nil
}

func (s *Server) enrollResponse(deviceID string, cert *x509.Certificate, rec *fleet.Certificate) *api.EnrollResponse {
	return &api.EnrollResponse{
		DeviceID:            deviceID,
		Identity:            cert.URIs[0].String(),
		CertificateChainPEM: s.cfg.CA.ChainPEM(cert),
		CACertificatesPEM:   s.cfg.CA.RootPEM(),
		Serial:              rec.Serial,
		NotAfter:            cert.NotAfter,
	}
}

// finish writes the response, counts and audits the outcome of an
// enrollment-type request.
func (s *Server) finish(w http.ResponseWriter, r *http.Request, method, action, deviceID string, resp any, err error) {
	if err != nil {
		err = asAPIError(err) // one *Error, so one refusal decision
	}
	s.account(r, method, action, deviceID, resp, err, false)
	s.respond(w, r, deviceID, resp, err)
}

// finishAudited is finish for a request whose success the registry audited
// in the issuing transaction (issuedAudit): only a refusal is audited here.
func (s *Server) finishAudited(w http.ResponseWriter, r *http.Request, method, action, deviceID string, resp any, err error) {
	if err != nil {
		err = asAPIError(err)
	}
	s.account(r, method, action, deviceID, resp, err, true)
	s.respond(w, r, deviceID, resp, err)
}

func (s *Server) respond(w http.ResponseWriter, r *http.Request, deviceID string, resp any, err error) {
	if err != nil {
		s.writeError(w, r, asAPIError(err), deviceID)
		return
	}
	writeJSON(w, http.StatusOK, resp)
}

// issuedAudit is the audit record of a successful enrollment, written by
// the registry in the transaction that records the certificate (it adds
// the serial and the outcome).
func (s *Server) issuedAudit(r *http.Request, action, deviceID string) *registry.AuditRecord {
	return &registry.AuditRecord{Actor: "device", Action: action, DeviceID: deviceID, Remote: r.RemoteAddr}
}

// account counts, audits and logs the outcome of an enrollment-type
// request. With okAudited, a success was audited by the registry already.
func (s *Server) account(r *http.Request, method, action, deviceID string, resp any, err error, okAudited bool) {
	if err != nil {
		e := asAPIError(err)
		s.enrolls.WithLabelValues(method, e.Code).Inc()
		if s.refusal(r, e) {
			// Not acknowledged to anyone: batched, not a synced write each.
			s.cfg.Registry.AuditBatched(registry.AuditRecord{Actor: "device", Action: action, DeviceID: auditDeviceID(deviceID), Outcome: registry.OutcomeDenied, Reason: e.Code + ": " + causeText(e), Remote: r.RemoteAddr})
		}
		return
	}
	s.enrolls.WithLabelValues(method, "ok").Inc()
	serial := ""
	if er, ok := resp.(*api.EnrollResponse); ok {
		serial = er.Serial
	}
	if !okAudited {
		s.cfg.Registry.Audit(registry.AuditRecord{Actor: "device", Action: action, DeviceID: deviceID, Outcome: registry.OutcomeOK, Remote: r.RemoteAddr, Serial: serial})
	}
	s.log.Info("certificate issued", logKeyDevice, deviceID, "method", method, "serial", serial, logKeyRemote, r.RemoteAddr)
}

// auditDeviceID keeps only a valid device ID in the audit log: an attacker's
// garbage is described in the reason, not used as a key.
func auditDeviceID(id string) string {
	if identity.ValidateName(id) != nil {
		return ""
	}
	return id
}

// causeText is the cause of e for a log line or an audit record, bounded:
// causes quote what a peer sent (a JSON field name, a CSR's bytes).
func causeText(e *Error) string {
	if e.Err != nil {
		return logguard.Bound(e.Err.Error(), maxLoggedCause)
	}
	return logguard.Bound(e.Msg, maxLoggedCause)
}

func csrError(err error) error {
	switch {
	case errors.Is(err, ca.ErrMalformedCSR):
		return apiErr(http.StatusBadRequest, "csr_malformed", "CSR is not a valid DER PKCS#10 request", err)
	case errors.Is(err, ca.ErrCSRSignature):
		return apiErr(http.StatusBadRequest, "csr_signature_invalid", "CSR signature does not verify with its public key", err)
	case errors.Is(err, ca.ErrWeakKey):
		return apiErr(http.StatusBadRequest, "csr_key_not_allowed", "CSR key must be ECDSA P-256/P-384 or RSA >= 2048: "+err.Error(), err)
	}
	return err
}

func registryError(err error) error {
	switch {
	case errors.Is(err, registry.ErrTokenUnknown):
		return apiErr(http.StatusUnauthorized, fleet.ReasonTokenUnknown, "bootstrap token is not valid", err)
	case errors.Is(err, registry.ErrTokenExpired):
		return apiErr(http.StatusUnauthorized, fleet.ReasonTokenExpired, "bootstrap token has expired", err)
	case errors.Is(err, registry.ErrTokenUsed):
		return apiErr(http.StatusUnauthorized, fleet.ReasonTokenUsed, "bootstrap token was already used", err)
	case errors.Is(err, registry.ErrTokenDevice):
		return apiErr(http.StatusForbidden, fleet.ReasonTokenDevice, "bootstrap token was minted for another device", err)
	case errors.Is(err, registry.ErrDeviceRevoked):
		return apiErr(http.StatusForbidden, fleet.ReasonDeviceRevoked, "device is revoked", err)
	case errors.Is(err, registry.ErrDeviceSuspended):
		return apiErr(http.StatusForbidden, fleet.ReasonDeviceSuspended, "device is suspended", err)
	case errors.Is(err, registry.ErrNotFound):
		return apiErr(http.StatusNotFound, fleet.ReasonNotFound, "not found", err)
	case errors.Is(err, registry.ErrConflict):
		return apiErr(http.StatusConflict, fleet.ReasonConflict, "concurrent request for the same record; retry", err)
	case errors.Is(err, registry.ErrTPMBound):
		return apiErr(http.StatusForbidden, fleet.ReasonDeviceTPMBound, "device is bound to a TPM and enrolls by TPM attestation only", err)
	case errors.Is(err, registry.ErrNameTaken):
		return apiErr(http.StatusConflict, fleet.ReasonNameTaken, err.Error(), err)
	case errors.Is(err, registry.ErrRenewalTooSoon):
		return apiErr(http.StatusTooManyRequests, fleet.ReasonRenewalRefused, err.Error(), err)
	case errors.Is(err, registry.ErrInvalidTransition):
		return apiErr(http.StatusConflict, fleet.ReasonInvalidState, err.Error(), err)
	}
	return err
}

func certRecord(c *x509.Certificate, id identity.Identity) *fleet.Certificate {
	return &fleet.Certificate{
		Serial: ca.SerialString(c.SerialNumber), Role: id.Role, Name: id.Name,
		NotBefore: c.NotBefore, NotAfter: c.NotAfter, DER: c.Raw,
	}
}

// ---- CA certificates ----

func (s *Server) handleCACerts(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/pem-certificate-chain")
	io.WriteString(w, s.cfg.CA.RootPEM())
	w.Write(ca.CertPEM(s.cfg.CA.Issuing()))
}

// ---- bootstrap tokens ----

const tokenPrefix = "fgt_"

// NewToken returns a token string and its ID and secret. The token is
// fgt_<16 hex ID>_<43 base64url secret>; only SHA-256(secret) is stored.
func NewToken(rnd io.Reader) (token, id string, secret []byte, err error) {
	idb := make([]byte, 8)
	secret = make([]byte, 32)
	if _, err = io.ReadFull(rnd, idb); err != nil {
		return
	}
	if _, err = io.ReadFull(rnd, secret); err != nil {
		return
	}
	id = hex.EncodeToString(idb)
	token = tokenPrefix + id + "_" + base64.RawURLEncoding.EncodeToString(secret)
	return
}

// ErrTokenFormat: the string is not a fleetgate bootstrap token.
var ErrTokenFormat = errors.New("enroll: malformed bootstrap token")

// ParseToken splits a token into ID and secret.
func ParseToken(tok string) (id string, secret []byte, err error) {
	rest, ok := strings.CutPrefix(tok, tokenPrefix)
	if !ok {
		return "", nil, ErrTokenFormat
	}
	id, sec, ok := strings.Cut(rest, "_")
	if !ok || len(id) != 16 {
		return "", nil, ErrTokenFormat
	}
	if _, err := hex.DecodeString(id); err != nil {
		return "", nil, ErrTokenFormat
	}
	secret, err = base64.RawURLEncoding.DecodeString(sec)
	if err != nil || len(secret) != 32 {
		return "", nil, ErrTokenFormat
	}
	return id, secret, nil
}

// ---- helpers ----

func decodeJSON(r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return apiErr(http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type must be application/json", nil)
	}
	body := http.MaxBytesReader(nil, r.Body, api.MaxBodyBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return apiErr(http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("request body exceeds %d bytes", api.MaxBodyBytes), err)
		}
		// The decoder's error quotes the input (an unknown field's name).
		return apiErr(http.StatusBadRequest, "malformed_json", "request body is not valid JSON for this endpoint: "+logguard.Clip(err.Error(), maxLoggedField), err)
	}
	if dec.More() {
		return apiErr(http.StatusBadRequest, "malformed_json", "request body has trailing data", nil)
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, e *Error, deviceID string) {
	lvl := slog.LevelWarn
	if e.Status >= 500 {
		lvl = slog.LevelError
	}
	if s.refusal(r, e) {
		s.log.Log(r.Context(), lvl, "request refused", "path", logguard.Bound(r.URL.Path, maxLoggedField), logKeyCode, e.Code, logKeyDevice, auditDeviceID(deviceID), logKeyRemote, r.RemoteAddr, logKeyErr, causeText(e))
	}
	setRetryAfter(w, e)
	writeJSON(w, e.Status, api.Error{Code: e.Code, Message: e.Msg})
}

func remoteIP(r *http.Request) string {
	h, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return h
}
