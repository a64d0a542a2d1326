package enroll

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/smallstep/pkcs7"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/logguard"
)

// registerLifecycleRoutes registers the renewal, CRL, EST and registry
// feed endpoints (revocation and suspension are the operator API's).
func (s *Server) registerLifecycleRoutes() {
	if s.cfg.CRLValidity <= 0 {
		s.cfg.CRLValidity = 24 * time.Hour
	}
	s.mux.HandleFunc("GET "+api.PathAdminFeed, s.admin(s.handleFeed))
	s.mux.HandleFunc("POST "+api.PathRenew, s.handleRenew)
	s.mux.HandleFunc("GET "+api.PathCRL, s.handleCRL)
	s.mux.HandleFunc("GET "+api.PathESTCACerts, s.handleESTCACerts)
	s.mux.HandleFunc("POST "+api.PathESTSimpleEnroll, s.handleESTSimpleEnroll)
	s.mux.HandleFunc("POST "+api.PathESTSimpleReenroll, s.handleESTSimpleReenroll)
	s.mux.HandleFunc("GET "+api.PathESTCSRAttrs, s.handleESTCSRAttrs)
	s.cfg.Registry.Watch(func(ev fleet.Event) {
		if ev.Kind == fleet.EventCertRevoked {
			s.crl.invalidate()
		}
	})
}

// ---- renewal ----

func (s *Server) handleRenew(w http.ResponseWriter, r *http.Request) {
	var req api.RenewRequest
	var id identity.Identity
	resp, err := func() (*api.EnrollResponse, error) {
		var leaf *x509.Certificate
		var err error
		if id, leaf, err = s.authenticate(r); err != nil {
			return nil, err
		}
		if err := decodeJSON(r, &req); err != nil {
			return nil, err
		}
		return s.renew(id, leaf, req.CSR, nil)
	}()
	s.finish(w, r, "renew", "renew", id.Name, resp, err)
}

// renew issues a new certificate for the key of leaf, the verified
// certificate presented over mTLS (authenticate); shared by /v1/renew and
// EST simplereenroll. prepare is as for enrollToken.
func (s *Server) renew(id identity.Identity, leaf *x509.Certificate, csrDER []byte, prepare func(*x509.Certificate) error) (*api.EnrollResponse, error) {
	if id.Role != identity.RoleDevice {
		return nil, apiErr(http.StatusForbidden, "device_required", "only devices renew here", nil)
	}
	csr, err := ca.CheckCSR(csrDER)
	if err != nil {
		return nil, csrError(err)
	}
	type eq interface{ Equal(crypto.PublicKey) bool }
	if k, ok := leaf.PublicKey.(eq); !ok || !k.Equal(csr.PublicKey) {
		return nil, apiErr(http.StatusBadRequest, "csr_key_mismatch", "renewal CSR must be for the key of the presented certificate", nil)
	}
	var cert *x509.Certificate
	rec, err := s.cfg.Registry.RecordRenewal(id.Name, ca.SerialString(leaf.SerialNumber), func(d fleet.Device) (*fleet.Certificate, error) {
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
	return s.enrollResponse(id.Name, cert, rec), nil
}

// ---- CRL ----

// crlCache holds the signed CRL; it is re-signed after every revocation and
// when half of its validity has passed.
type crlCache struct {
	mu    sync.Mutex
	der   []byte
	until time.Time
	dirty bool
}

func (c *crlCache) invalidate() {
	c.mu.Lock()
	c.dirty = true
	c.mu.Unlock()
}

func (s *Server) refreshCRL() {
	if _, err := s.currentCRL(true); err != nil {
		s.log.Error("CRL generation failed", logKeyErr, err)
	}
}

func (s *Server) currentCRL(force bool) ([]byte, error) {
	s.crl.mu.Lock()
	defer s.crl.mu.Unlock()
	now := s.cfg.CA.Now()
	if !force && !s.crl.dirty && s.crl.der != nil && now.Before(s.crl.until) {
		return s.crl.der, nil
	}
	revoked, err := s.cfg.Registry.RevokedCertificates(now)
	if err != nil {
		return nil, err
	}
	entries := make([]ca.Revoked, 0, len(revoked))
	for _, c := range revoked {
		n, ok := new(big.Int).SetString(c.Serial, 16)
		if !ok {
			continue
		}
		entries = append(entries, ca.Revoked{Serial: n, RevokedAt: c.RevokedAt, ReasonCode: ca.ReasonCodeOf(c.RevokeReason)})
	}
	num, err := s.cfg.Registry.NextCRLNumber()
	if err != nil {
		return nil, err
	}
	der, err := s.cfg.CA.CRL(num, entries, s.cfg.CRLValidity)
	if err != nil {
		return nil, err
	}
	s.crl.der, s.crl.until, s.crl.dirty = der, now.Add(s.cfg.CRLValidity/2), false
	return der, nil
}

func (s *Server) handleCRL(w http.ResponseWriter, r *http.Request) {
	der, err := s.currentCRL(false)
	if err != nil {
		s.writeError(w, r, asAPIError(err), "")
		return
	}
	w.Header().Set("Content-Type", api.ContentTypeCRL)
	w.Header().Set("Cache-Control", "no-cache")
	w.Write(der)
}

// ---- EST (RFC 7030) ----

// estError writes an EST error: plain text, as RFC 7030 section 4.2.3
// allows, with the same status mapping as the JSON API.
func (s *Server) estError(w http.ResponseWriter, r *http.Request, err error, deviceID string) {
	e := asAPIError(err)
	if s.refusal(r, e) {
		s.log.Warn("EST request refused", "path", logguard.Bound(r.URL.Path, maxLoggedField), logKeyCode, e.Code, logKeyDevice, auditDeviceID(deviceID), logKeyRemote, r.RemoteAddr, logKeyErr, causeText(e))
	}
	if e.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="fleetgate EST"`)
	}
	setRetryAfter(w, e)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(e.Status)
	fmt.Fprintf(w, "%s: %s\n", e.Code, e.Msg)
}

// certsOnly returns a base64 PKCS#7 certs-only body (RFC 7030 4.1.3).
func certsOnly(certs ...*x509.Certificate) ([]byte, error) {
	var raw []byte
	for _, c := range certs {
		raw = append(raw, c.Raw...)
	}
	p7, err := pkcs7.DegenerateCertificate(raw)
	if err != nil {
		return nil, fmt.Errorf("pkcs7: %w", err)
	}
	return []byte(base64Lines(p7)), nil
}

// writeBase64 writes a base64 body of content type ct.
func writeBase64(w http.ResponseWriter, ct string, body []byte) {
	w.Header().Set("Content-Type", ct)
	w.Header().Set(api.HeaderTransferEncoding, "base64")
	w.Write(body)
}

func base64Lines(b []byte) string {
	s := base64.StdEncoding.EncodeToString(b)
	var out strings.Builder
	for len(s) > 64 {
		out.WriteString(s[:64])
		out.WriteString("\r\n")
		s = s[64:]
	}
	out.WriteString(s)
	out.WriteString("\r\n")
	return out.String()
}

func (s *Server) handleESTCACerts(w http.ResponseWriter, r *http.Request) {
	body, err := certsOnly(s.cfg.CA.Issuing(), s.cfg.CA.Root)
	if err != nil {
		s.estError(w, r, err, "")
		return
	}
	writeBase64(w, api.ContentTypePKCS7Certs, body)
}

// estCSRAttrs is the CSR attributes answer (RFC 7030 4.5.2): what every
// enrollment requires, a key of type id-ecPublicKey on curve secp256r1
// (P-256), encoded as the RFC's example encodes it (an Attribute whose
// type is id-ecPublicKey and whose value is the curve), and the signature
// algorithm ecdsa-with-SHA256. The device identity comes from the EST
// username or the client certificate, never from the CSR, so nothing else
// is asked for.
var estCSRAttrs = func() []byte {
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.ObjectIdentifier `asn1:"set"`
	}
	der, err := asn1.Marshal([]any{
		asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}, // ecdsa-with-SHA256
		attribute{Type: asn1.ObjectIdentifier{1, 2, 840, 10045, 2, 1}, // id-ecPublicKey
			Values: []asn1.ObjectIdentifier{{1, 2, 840, 10045, 3, 1, 7}}}, // secp256r1
	})
	if err != nil {
		panic(err)
	}
	return []byte(base64Lines(der))
}()

func (s *Server) handleESTCSRAttrs(w http.ResponseWriter, r *http.Request) {
	writeBase64(w, api.ContentTypeCSRAttrs, estCSRAttrs)
}

// readPKCS10 reads an EST request body: base64 DER PKCS#10.
func readPKCS10(r *http.Request) ([]byte, error) {
	ct := r.Header.Get("Content-Type")
	if ct != "" && !strings.HasPrefix(ct, api.ContentTypePKCS10) {
		return nil, apiErr(http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Type must be application/pkcs10", nil)
	}
	b, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, api.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, apiErr(http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("request body exceeds %d bytes", api.MaxBodyBytes), err)
		}
		return nil, apiErr(http.StatusBadRequest, "read_failed", "could not read body", err)
	}
	der, err := base64.StdEncoding.DecodeString(string(bytes.Join(bytes.Fields(b), nil)))
	if err != nil {
		return nil, apiErr(http.StatusBadRequest, "csr_malformed", "body must be base64-encoded DER PKCS#10", err)
	}
	return der, nil
}

// handleESTSimpleEnroll enrolls with a bootstrap token as HTTP Basic
// credentials: user = device ID, password = token (RFC 7030 3.2.3).
func (s *Server) handleESTSimpleEnroll(w http.ResponseWriter, r *http.Request) {
	user, pass, ok := r.BasicAuth()
	var body estBody
	resp, err := func() (*api.EnrollResponse, error) {
		if !ok {
			return nil, apiErr(http.StatusUnauthorized, "credentials_required", "HTTP Basic credentials (device ID, bootstrap token) required", nil)
		}
		csr, err := readPKCS10(r)
		if err != nil {
			return nil, err
		}
		return s.enrollToken(user, pass, csr, s.issuedAudit(r, "enroll.est", user), body.prepare)
	}()
	s.finishEST(w, r, "est", "enroll.est", user, resp, body.b, err, true)
}

func (s *Server) handleESTSimpleReenroll(w http.ResponseWriter, r *http.Request) {
	var id identity.Identity
	var body estBody
	resp, err := func() (*api.EnrollResponse, error) {
		var leaf *x509.Certificate
		var err error
		if id, leaf, err = s.authenticate(r); err != nil {
			return nil, err
		}
		csr, err := readPKCS10(r)
		if err != nil {
			return nil, err
		}
		return s.renew(id, leaf, csr, body.prepare)
	}()
	s.finishEST(w, r, "est-reenroll", "renew.est", id.Name, resp, body.b, err, false)
}

// estBody is the answer to simpleenroll and simplereenroll: a certs-only
// PKCS#7 holding only the issued certificate (RFC 7030 4.2.3; a client may
// refuse more), built by prepare inside the issuing transaction.
type estBody struct{ b []byte }

func (e *estBody) prepare(cert *x509.Certificate) error {
	var err error
	e.b, err = certsOnly(cert)
	return err
}

// finishEST is finish for EST; okAudited as for account. body is the
// prepared answer.
func (s *Server) finishEST(w http.ResponseWriter, r *http.Request, method, action, deviceID string, resp *api.EnrollResponse, body []byte, err error, okAudited bool) {
	if err != nil {
		err = asAPIError(err)
	}
	s.account(r, method, action, deviceID, resp, err, okAudited)
	if err != nil {
		s.estError(w, r, err, deviceID)
		return
	}
	writeBase64(w, api.ContentTypePKCS7Certs, body)
}
