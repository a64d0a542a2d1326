// Package operator is the operator API: bootstrap tokens (create, list,
// revoke), services and operators (certificates by name; operator roles
// admin and read-only, roles.go), devices and groups (list, show,
// attributes, revoke, suspend, resume), certificate revocation with CRL
// reason codes, manufacturing registration of TPM endorsement keys, the
// broker's sessions and retained messages, the policy (show, reload) and
// the audit log. Only operator certificates may
// call it (mTLS, checked against the registry). It is mounted on the
// enrollment service's listener under /v1/admin/ (the registry change feed
// there belongs to the directory) and talks to the broker through Broker.
// Its client is operator/client.
package operator

import (
	"crypto/x509"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
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
	// Online returns the number of live connections of a name: client ID
	// <name> and <name>:<suffix> (a service's replicas).
	Online(name string) int
	// Clients returns every session, online or persistent offline, sorted
	// by client ID.
	Clients() []api.Client
	// Disconnect closes the live connection of a client ID (its persistent
	// session stays). found: the broker knows the client ID.
	Disconnect(clientID string) (wasOnline, found bool)
	// Retained returns the retained messages matching filter, by topic.
	Retained(filter string) []api.Retained
	// DeleteRetained deletes the retained message of topic (exact).
	DeleteRetained(topic string) int
	// Policy returns the policy in force and its file's text.
	Policy() api.PolicyShowResponse
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
	// CAFollower makes the process follow an issuing-CA rotation (ca.go).
	CAFollower CAFollower
	Logger     *slog.Logger
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
	// dir is the registry's directory: the one check of a client
	// certificate (Verify).
	dir *directory.Directory
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
	return &Server{cfg: cfg, log: cfg.Logger, enroll: cfg.Enroll, dir: cfg.Registry.Directory()}, nil
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
	m.HandleFunc("POST "+api.PathAdminDiagnose, s.admin(s.handleDiagnose))
	s.registerAdmin(m)
	s.registerCA(m)
}

// authenticate returns the identity of r's client certificate once it
// verifies against the CA and the directory vouches for it
// (directory.Verify: a serial the registry issued, not revoked, to the
// same identity). A device's state is not the operator API's concern: a
// device is refused as not an operator (admin).
func (s *Server) authenticate(r *http.Request) (identity.Identity, error) {
	leaf, err := s.enroll.VerifiedClientCert(r)
	if err != nil {
		return identity.Identity{}, err
	}
	id, _, err := s.dir.Verify(leaf, s.cfg.CA.TrustDomain, time.Now())
	switch {
	case err == nil:
		return id, nil
	case errors.Is(err, directory.ErrStale):
		// A cluster node cut off from the others (or loaded past its
		// bound) vouches for no certificate, an operator's included: the
		// call may be retried here or through another node.
		return identity.Identity{}, apiErr(http.StatusServiceUnavailable, fleet.ReasonDirectoryStale, "this node's view of revocations is stale (cut off from the cluster?): try again, or through another node", err)
	case errors.Is(err, directory.ErrUnknownSerial):
		return identity.Identity{}, apiErr(http.StatusUnauthorized, fleet.ReasonClientCertUnknown, "client certificate was not issued by this registry", nil)
	case errors.Is(err, directory.ErrRevoked) && s.certRevoked(leaf):
		return identity.Identity{}, apiErr(http.StatusUnauthorized, fleet.ReasonClientCertRevoked, "client certificate is revoked", nil)
	case errors.Is(err, directory.ErrIdentityDiffer):
		return identity.Identity{}, apiErr(http.StatusUnauthorized, fleet.ReasonClientCertIdentity, "client certificate identity does not match the registry", nil)
	case errors.Is(err, directory.ErrRevoked), errors.Is(err, directory.ErrSuspended), errors.Is(err, directory.ErrUnknownDevice):
		return id, nil // the device's state; its certificate is vouched for
	case errors.Is(err, directory.ErrExpired), errors.Is(err, directory.ErrIssuerNotTrusted):
		return identity.Identity{}, apiErr(http.StatusUnauthorized, fleet.ReasonClientCertInvalid, "client certificate does not verify against this fleetgate's CA (unknown issuer, expired or not for client authentication)", err)
	}
	return identity.Identity{}, apiErr(http.StatusUnauthorized, fleet.ReasonClientCertIdentity, "client certificate carries no valid identity", err)
}

// certRevoked reports whether the directory has leaf revoked (rather than
// its device).
func (s *Server) certRevoked(leaf *x509.Certificate) bool {
	st, ok := s.dir.CertStatus(fleet.SerialString(leaf.SerialNumber))
	return ok && st.Revoked
}

// admin wraps a handler that only operators may call.
func (s *Server) admin(h func(http.ResponseWriter, *http.Request, identity.Identity)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, err := s.authenticate(r)
		if err == nil && id.Role != identity.RoleOperator {
			err = apiErr(http.StatusForbidden, fleet.ReasonOperatorRequired, "the admin API is for operator certificates only", errNotOperator)
		}
		if err == nil && !readsOnly(r) {
			err = s.mayChange(r, id)
		}
		if err != nil {
			e := asAPIError(err)
			// A read-only operator's refusal is audited in full (mayChange).
			if s.enroll.Refusal(r, e) && e.Code != codeReadOnly {
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
