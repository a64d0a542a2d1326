// Package operator is the operator API: bootstrap tokens, service
// certificates, devices (list, show, attributes, revoke, suspend, resume),
// certificate revocation, manufacturing registration of TPM endorsement
// keys, policy reload and the audit log. Only operator certificates may
// call it (mTLS, checked against the registry). It is mounted on the
// enrollment service's listener under /v1/admin/ (the registry change feed
// there belongs to the directory) and talks to the broker through Broker.
// Its client is operator/client.
package operator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// Broker is what the operator API needs of the broker running in this
// process.
type Broker interface {
	// Connected reports whether the named client has a live session.
	Connected(name string) bool
	// ReloadPolicy reloads the policy file and reports which file and how
	// many rules are in force; a bad file is refused, the old policy stays.
	ReloadPolicy() (api.PolicyReloadResponse, error)
}

// Config configures a Server.
type Config struct {
	CA       *ca.Authority
	Registry *registry.Registry
	// Enroll is the enrollment service whose listener the API shares, with
	// its refusal limiter, CRL and EK certificate checks.
	Enroll *enroll.Server
	// Broker is the broker of this process; nil: none (policy reload is
	// refused, devices are never reported online).
	Broker Broker
	Logger *slog.Logger
	// MaxTokenTTL bounds bootstrap token lifetimes (default 30 days).
	MaxTokenTTL time.Duration
	// ServiceCertTTL is the service certificate lifetime (default 1 year).
	ServiceCertTTL time.Duration
}

// Server serves the operator API.
type Server struct {
	cfg    Config
	log    *slog.Logger
	enroll *enroll.Server
}

// Log keys (as the enrollment service's).
const (
	logKeyDevice = "device"
	logKeyActor  = "actor"
)

// Errors and helpers shared with the enrollment service: one error type,
// one mapping of registry errors, one way to read and write JSON.
var (
	apiErr            = enroll.NewError
	asAPIError        = enroll.AsError
	decodeJSON        = enroll.DecodeJSON
	decodeJSONLimit   = enroll.DecodeJSONLimit
	writeJSON         = enroll.WriteJSON
	registryError     = enroll.RegistryError
	registrationError = enroll.RegistrationError
	csrError          = enroll.CSRError
	certRecord        = enroll.CertRecord
	auditDeviceID     = enroll.AuditDeviceID
	causeText         = enroll.CauseText
	problemMessage    = enroll.ProblemMessage
)

const (
	maxLoggedCause = enroll.MaxLoggedCause
	maxLoggedField = enroll.MaxLoggedField
)

var errNotOperator = errors.New("certificate is not an operator's")

// New returns a Server.
func New(cfg Config) (*Server, error) {
	if cfg.CA == nil || cfg.Registry == nil || cfg.Enroll == nil {
		return nil, errors.New("operator: CA, Registry and Enroll are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.MaxTokenTTL <= 0 {
		cfg.MaxTokenTTL = 30 * 24 * time.Hour
	}
	if cfg.ServiceCertTTL <= 0 {
		cfg.ServiceCertTTL = 365 * 24 * time.Hour
	}
	return &Server{cfg: cfg, log: cfg.Logger, enroll: cfg.Enroll}, nil
}

// Mux is where the routes are mounted.
type Mux interface {
	HandleFunc(pattern string, h http.HandlerFunc)
}

// Register mounts the operator API's routes on m.
func (s *Server) Register(m Mux) {
	m.HandleFunc("POST "+api.PathAdminTokens, s.admin(s.handleTokenCreate))
	m.HandleFunc("POST "+api.PathAdminServices, s.admin(s.handleServiceIssue))
	m.HandleFunc("GET "+api.PathAdminDevices, s.admin(s.handleDeviceList))
	m.HandleFunc("GET "+api.PathAdminDevices+"/{id}", s.admin(s.handleDeviceShow))
	m.HandleFunc("GET "+api.PathAdminAudit, s.admin(s.handleAudit))
	m.HandleFunc("POST "+api.PathAdminDevicesRegister, s.admin(s.handleRegister))
	m.HandleFunc("POST "+api.PathAdminDevicesImport, s.admin(s.handleImport))
	m.HandleFunc("POST "+api.PathAdminDeviceAction+"{id}/{action}", s.admin(s.handleDeviceAction))
	m.HandleFunc("POST "+api.PathAdminCertificates+"{serial}/revoke", s.admin(s.handleCertRevoke))
	m.HandleFunc("PATCH "+api.PathAdminDevices+"/{id}", s.admin(s.handleDeviceUpdate))
	m.HandleFunc("POST "+api.PathAdminPolicyReload, s.admin(s.handlePolicyReload))
}

// authenticate returns the identity of r's client certificate once it
// verifies against the CA and the registry vouches for it (known serial,
// not revoked, same identity).
func (s *Server) authenticate(r *http.Request) (identity.Identity, error) {
	return s.enroll.Authenticate(r)
}

// admin wraps a handler that only operators may call.
func (s *Server) admin(h func(http.ResponseWriter, *http.Request, identity.Identity)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := s.authenticate(r)
		if err == nil && id.Role != identity.RoleOperator {
			err = apiErr(http.StatusForbidden, "operator_required", "the admin API is for operator certificates only", errNotOperator)
		}
		if err != nil {
			e := asAPIError(err)
			if s.enroll.Refusal(r, e) {
				s.cfg.Registry.AuditBatched(registry.AuditRecord{Actor: id.String(), Action: logguard.Bound("admin "+r.Method+" "+r.URL.Path, maxLoggedField), Outcome: registry.OutcomeDenied, Reason: e.Code, Remote: r.RemoteAddr})
			}
			s.enroll.WriteError(w, r, e, "")
			return
		}
		h(w, r, id)
	}
}

// online reports whether a device has a live MQTT session in this
// process's broker.
func (s *Server) online(deviceID string) bool {
	return s.cfg.Broker != nil && s.cfg.Broker.Connected(deviceID)
}

func (s *Server) handleServiceIssue(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.ServiceIssueRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	id, err := identity.New(identity.RoleService, req.Name)
	if err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_name", err.Error(), err), "")
		return
	}
	// Service names and device IDs are both MQTT client IDs: one namespace.
	if _, taken := s.cfg.Registry.DeviceStatus(id.Name); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, "name_taken", fmt.Sprintf("%q is a device ID; service names and device IDs share the MQTT client ID namespace", id.Name), nil), "")
		return
	}
	if role, taken := s.cfg.Registry.PrincipalRole(id.Name); taken && role != identity.RoleService {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, "name_taken", fmt.Sprintf("%q is an %s's name", id.Name, role), nil), "")
		return
	}
	resp := api.ServiceIssueResponse{Identity: id.URI(s.cfg.CA.TrustDomain).String(), CACertificatesPEM: s.cfg.CA.RootPEM()}
	var pub any
	if len(req.CSR) > 0 {
		csr, err := ca.CheckCSR(req.CSR)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(csrError(err)), "")
			return
		}
		pub = csr.PublicKey
	} else {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), "")
			return
		}
		kp, err := ca.KeyPEM(k)
		if err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), "")
			return
		}
		pub = k.Public()
		resp.PrivateKeyPEM = string(kp)
	}
	ttl := req.TTL
	if ttl <= 0 || ttl > s.cfg.ServiceCertTTL {
		ttl = s.cfg.ServiceCertTTL
	}
	cert, err := s.cfg.CA.Issue(id, pub, ttl)
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(csrError(err)), "")
		return
	}
	rec := certRecord(cert, id)
	if err := s.cfg.Registry.RecordCertificate(rec); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "service.issue", Outcome: registry.OutcomeOK, Reason: id.String(), Serial: rec.Serial, Remote: r.RemoteAddr})
	s.log.Info("service certificate issued", "service", id.Name, "serial", rec.Serial, logKeyActor, op.String())
	resp.CertificateChainPEM = s.cfg.CA.ChainPEM(cert)
	resp.Serial = rec.Serial
	resp.NotAfter = cert.NotAfter
	writeJSON(w, http.StatusCreated, resp)
}

func (s *Server) toAPIDevice(d registry.Device) api.Device {
	online := s.online(d.ID)
	return api.Device{ID: d.ID, Group: d.Group, State: string(d.State), AttestationMethod: d.AttestationMethod,
		Serial: d.CurrentSerial, NotAfter: d.NotAfter, CreatedAt: d.CreatedAt, Online: online, Tags: d.Tags}
}

func (s *Server) handleDeviceList(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	ds, err := s.cfg.Registry.Devices()
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	out := make([]api.Device, 0, len(ds))
	for _, d := range ds {
		out = append(out, s.toAPIDevice(d))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleDeviceShow(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	id := r.PathValue("id")
	if err := identity.ValidateName(id); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	d, err := s.cfg.Registry.Device(id)
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), id)
		return
	}
	writeJSON(w, http.StatusOK, s.toAPIDevice(*d))
}

// handleAudit returns one page of the audit log, newest first: at most
// limit records (api.DefaultAuditLimit, at most api.MaxAuditLimit) older
// than cursor, optionally of one device. It reads about as many records as
// it returns (registry.AuditPage).
func (s *Server) handleAudit(w http.ResponseWriter, r *http.Request, _ identity.Identity) {
	q := r.URL.Query()
	dev := q.Get("device")
	if dev != "" {
		if err := identity.ValidateName(dev); err != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
			return
		}
	}
	limit := api.DefaultAuditLimit
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_limit", "limit must be a positive number", err), "")
			return
		}
		limit = min(n, api.MaxAuditLimit)
	}
	recs, next, err := s.cfg.Registry.AuditPage(registry.AuditQuery{DeviceID: dev, Limit: limit, Cursor: q.Get("cursor")})
	if errors.Is(err, registry.ErrAuditCursor) {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_cursor", "cursor must be the next value of a previous page", err), "")
		return
	}
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	out := api.AuditPage{Records: make([]api.AuditRecord, 0, len(recs)), Next: next}
	for _, a := range recs {
		out.Records = append(out.Records, api.AuditRecord(a))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleDeviceUpdate(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id := r.PathValue("id")
	if err := identity.ValidateName(id); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	var req api.DeviceUpdateRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), id)
		return
	}
	if req.Group != "" {
		if err := identity.ValidateName(req.Group); err != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err), id)
			return
		}
	}
	for k, v := range req.Tags {
		// Tags are substituted into topic levels: same rules as names.
		if identity.ValidateName(k) != nil || identity.ValidateName(v) != nil {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_tag", fmt.Sprintf("tag %q=%q: keys and values must be [a-z0-9-]{1,64}", k, v), nil), id)
			return
		}
	}
	d, err := s.cfg.Registry.UpdateAttributes(id, req.Group, req.Tags, op.String())
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), id)
		return
	}
	writeJSON(w, http.StatusOK, s.toAPIDevice(*d))
}

func (s *Server) handlePolicyReload(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	if s.cfg.Broker == nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusNotImplemented, "no_broker", "no broker runs in this process; send SIGHUP to the broker process", nil), "")
		return
	}
	res, err := s.cfg.Broker.ReloadPolicy()
	rec := registry.AuditRecord{Actor: op.String(), Action: "policy.reload", Outcome: registry.OutcomeOK,
		Reason: fmt.Sprintf("%s: %d rules (%d compiled) in force", res.File, res.FileRules, res.Rules)}
	if err != nil {
		rec.Outcome, rec.Reason = registry.OutcomeDenied, err.Error()
	}
	s.cfg.Registry.Audit(rec)
	if err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusUnprocessableEntity, "policy_invalid", "policy refused, the previous one stays in force:\n"+err.Error(), err), "")
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) handleTokenCreate(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.TokenCreateRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	if err := identity.ValidateName(req.DeviceID); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	if _, taken := s.cfg.Registry.PrincipalRole(req.DeviceID); taken {
		s.enroll.WriteError(w, r, apiErr(http.StatusConflict, "name_taken", fmt.Sprintf("%q is a service or operator name; device IDs and names share the MQTT client ID namespace", req.DeviceID), nil), "")
		return
	}
	if req.Group == "" {
		req.Group = "default"
	}
	if err := identity.ValidateName(req.Group); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_group", "group: "+err.Error(), err), "")
		return
	}
	if req.TTL <= 0 {
		req.TTL = 24 * time.Hour
	}
	if req.TTL > s.cfg.MaxTokenTTL {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "ttl_too_long", fmt.Sprintf("token TTL %s exceeds the maximum %s", req.TTL, s.cfg.MaxTokenTTL), nil), "")
		return
	}
	tok, id, secret, err := enroll.NewToken(rand.Reader)
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	now := s.cfg.CA.Now()
	t := registry.Token{ID: id, Hash: registry.HashTokenSecret(secret), DeviceID: req.DeviceID, Group: req.Group,
		CreatedBy: op.String(), CreatedAt: now, ExpiresAt: now.Add(req.TTL)}
	if err := s.cfg.Registry.CreateToken(t, op.String()); err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), req.DeviceID)
		return
	}
	s.log.Info("bootstrap token created", logKeyDevice, req.DeviceID, "group", req.Group, "expires", t.ExpiresAt, logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, api.TokenCreateResponse{Token: tok, DeviceID: req.DeviceID, Group: req.Group, ExpiresAt: t.ExpiresAt})
}

// ---- revoke, suspend, resume ----

func (s *Server) handleDeviceAction(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	id, action := r.PathValue("id"), r.PathValue("action")
	if err := identity.ValidateName(id); err != nil {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_device_id", err.Error(), err), "")
		return
	}
	var req api.StateChangeRequest
	if r.ContentLength != 0 {
		if err := decodeJSON(r, &req); err != nil {
			s.enroll.WriteError(w, r, asAPIError(err), id)
			return
		}
	}
	resp := api.StateChangeResponse{DeviceID: id}
	var err error
	switch action {
	case "revoke":
		if req.Reason == "" {
			s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a reason", nil), id)
			return
		}
		resp.RevokedSerials, err = s.cfg.Registry.RevokeDevice(id, req.Reason, op.String())
		if err == nil {
			s.enroll.RefreshCRL()
		}
	case "suspend":
		err = s.cfg.Registry.SetSuspended(id, true, req.Reason, op.String())
	case "resume":
		err = s.cfg.Registry.SetSuspended(id, false, req.Reason, op.String())
	default:
		s.enroll.WriteError(w, r, apiErr(http.StatusNotFound, "unknown_action", "action must be revoke, suspend or resume", nil), id)
		return
	}
	if err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), id)
		return
	}
	if st, ok := s.cfg.Registry.DeviceStatus(id); ok {
		resp.State = string(st.State)
	}
	// Registry watchers (the in-process broker) ran before the registry
	// call returned: sessions are closed by now.
	resp.SessionsClosed = s.cfg.Broker != nil && !s.cfg.Broker.Connected(id)
	s.log.Info("device "+action, logKeyDevice, id, "reason", logguard.Bound(req.Reason, maxLoggedCause), logKeyActor, op.String(), "revoked_serials", len(resp.RevokedSerials))
	writeJSON(w, http.StatusOK, resp)
}

func (s *Server) handleCertRevoke(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	serial := strings.ToLower(r.PathValue("serial"))
	if _, ok := new(big.Int).SetString(serial, 16); !ok {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "invalid_serial", "serial must be hexadecimal", nil), "")
		return
	}
	var req api.StateChangeRequest
	if err := decodeJSON(r, &req); err != nil || req.Reason == "" {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "reason_required", "revocation needs a JSON body with a reason", err), "")
		return
	}
	if err := s.cfg.Registry.RevokeCertificate(serial, req.Reason, op.String()); err != nil {
		s.enroll.WriteError(w, r, asAPIError(registryError(err)), "")
		return
	}
	s.enroll.RefreshCRL()
	writeJSON(w, http.StatusOK, api.StateChangeResponse{RevokedSerials: []string{serial}, SessionsClosed: true})
}

// ---- manufacturing registration (EKs) ----

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.EKRegisterRequest
	if err := decodeJSON(r, &req); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	reg, err := s.enroll.CheckEKRegistration(&req)
	if err == nil {
		err = s.cfg.Registry.RegisterEK(reg, op.String())
		if err != nil {
			err = registrationError(err)
		}
	}
	if err != nil {
		e := asAPIError(err)
		s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "ek.register", DeviceID: auditDeviceID(req.DeviceID), Outcome: registry.OutcomeDenied, Reason: e.Code + ": " + causeText(e), Remote: r.RemoteAddr})
		s.enroll.WriteError(w, r, e, req.DeviceID)
		return
	}
	s.log.Info("EK registered", logKeyDevice, reg.DeviceID, "group", reg.Group, "ek", reg.Fingerprint, logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, api.EKRegistration{DeviceID: reg.DeviceID, Group: reg.Group, EKFingerprint: reg.Fingerprint})
}

func (s *Server) handleImport(w http.ResponseWriter, r *http.Request, op identity.Identity) {
	var req api.EKImportRequest
	if err := decodeJSONLimit(r, &req, api.MaxImportBodyBytes); err != nil {
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	if len(req.Entries) == 0 || len(req.Entries) > api.MaxImportEntries {
		s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, "import_size", fmt.Sprintf("an import holds 1 to %d entries, not %d", api.MaxImportEntries, len(req.Entries)), nil), "")
		return
	}
	var problems []api.ImportProblem
	problem := func(i int, err error) {
		e := asAPIError(err)
		problems = append(problems, api.ImportProblem{Index: i, Line: req.Entries[i].Line, DeviceID: req.Entries[i].DeviceID, Code: e.Code, Message: problemMessage(e)})
	}
	regs := make([]registry.EKRegistration, 0, len(req.Entries))
	idx := make([]int, 0, len(req.Entries)) // regs[k] is entry idx[k]
	for i := range req.Entries {
		reg, err := s.enroll.CheckEKRegistration(&req.Entries[i])
		if err != nil {
			problem(i, err)
			continue
		}
		regs = append(regs, reg)
		idx = append(idx, i)
	}
	// Conflicts among the valid entries and with the registry, so that one
	// answer reports every bad entry.
	rp, err := s.cfg.Registry.CheckEKImport(regs)
	if err == nil && len(rp) == 0 && len(problems) == 0 && !req.DryRun {
		err = s.cfg.Registry.ImportEKs(regs, op.String())
		var ie *registry.ImportError
		if errors.As(err, &ie) { // changed since the check
			rp, err = ie.Problems, nil
		}
	}
	if err != nil {
		if errors.Is(err, registry.ErrImportTooLarge) {
			err = apiErr(http.StatusRequestEntityTooLarge, "import_too_large", fmt.Sprintf("%d entries do not fit in one transaction; nothing was registered, split the import", len(regs)), err)
		}
		s.enroll.WriteError(w, r, asAPIError(err), "")
		return
	}
	for _, p := range rp {
		problem(idx[p.Index], registrationError(p.Err))
	}
	if len(problems) > 0 {
		slices.SortFunc(problems, func(a, b api.ImportProblem) int { return a.Index - b.Index })
		if !req.DryRun {
			s.cfg.Registry.Audit(registry.AuditRecord{Actor: op.String(), Action: "ek.import", Outcome: registry.OutcomeDenied,
				Reason: fmt.Sprintf("import_refused: %d of %d entries bad; nothing registered", len(problems), len(req.Entries)), Remote: r.RemoteAddr})
		}
		s.log.Warn("EK import refused", "entries", len(req.Entries), "bad", len(problems), logKeyActor, op.String())
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnprocessableEntity)
		_ = json.NewEncoder(w).Encode(struct {
			api.Error
			api.EKImportResponse
		}{api.Error{Code: "import_refused", Message: fmt.Sprintf("%d of %d entries are bad; nothing was registered", len(problems), len(req.Entries))}, api.EKImportResponse{Problems: problems}})
		return
	}
	out := api.EKImportResponse{Registered: make([]api.EKRegistration, len(regs))}
	for i, reg := range regs {
		out.Registered[i] = api.EKRegistration{DeviceID: reg.DeviceID, Group: reg.Group, EKFingerprint: reg.Fingerprint}
	}
	if req.DryRun {
		writeJSON(w, http.StatusOK, out)
		return
	}
	s.log.Info("EKs imported", "entries", len(regs), logKeyActor, op.String())
	writeJSON(w, http.StatusCreated, out)
}
