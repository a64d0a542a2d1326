// Package ocsp is fleetgate's OCSP responder (RFC 6960, with the RFC 5019
// profile for caching), built on golang.org/x/crypto/ocsp.
//
// It answers for every issuing CA the caller trusts now (Config.Issuers,
// asked on every request, so a rotation needs no restart) from a Source,
// the directory in a server: a revocation, or a suspension, shows the
// moment the directory has it. Responses are signed by a delegated OCSP
// signing certificate per issuing CA (id-kp-OCSPSigning, id-pkix-ocsp-nocheck,
// short-lived), created with the CA's crypto.Signer and replaced well
// before it expires, so the CA key (possibly in an HSM or TPM) signs once
// a day, not once per response.
//
// GET (/ocsp/{base64}) and POST are served; a request nonce is echoed in
// responseExtensions (x/crypto/ocsp would put extensions in the single
// response, where OpenSSL does not look); requests are bounded in size.
package ocsp

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	xocsp "golang.org/x/crypto/ocsp"
	"golang.org/x/time/rate"
)

// Limits of a request.
const (
	// MaxRequestBytes bounds a POST body. A one-certificate request with a
	// nonce is about 100 bytes.
	MaxRequestBytes = 4 << 10
	// MaxGETPath bounds the encoded request in a GET URL.
	MaxGETPath = 1024
	// maxCache bounds the cached nonce-less responses.
	maxCache = 50000
)

// Defaults of Config.
const (
	DefaultSignerLifetime   = 24 * time.Hour
	DefaultSignerRenewAfter = 16 * time.Hour
	DefaultValidity         = time.Hour
)

// Status codes of a Status (x/crypto/ocsp's).
const (
	Good    = xocsp.Good
	Revoked = xocsp.Revoked
	Unknown = xocsp.Unknown
)

// Reason codes (RFC 5280) used here.
const (
	ReasonUnspecified     = xocsp.Unspecified
	ReasonCertificateHold = xocsp.CertificateHold
)

var (
	oidNonce   = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 48, 1, 2}
	oidNoCheck = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 48, 1, 5}
)

// Issuer is an issuing CA the responder answers for, with its key, which
// certifies the delegated signers.
type Issuer struct {
	Cert   *x509.Certificate
	Signer crypto.Signer
}

// Status is what the Source says of one certificate.
type Status struct {
	Status    int // Good, Revoked or Unknown
	RevokedAt time.Time
	Reason    int
}

// Source tells the status of the certificate serial issued by issuer:
// Unknown for a serial it never issued.
type Source interface {
	Status(issuer *x509.Certificate, serial *big.Int) Status
}

// SourceFunc adapts a function to Source.
type SourceFunc func(issuer *x509.Certificate, serial *big.Int) Status

// Status implements Source.
func (f SourceFunc) Status(issuer *x509.Certificate, serial *big.Int) Status {
	return f(issuer, serial)
}

// Config of a Responder.
type Config struct {
	// Issuers lists the issuing CAs trusted now; called per request.
	Issuers func() []Issuer
	Source  Source
	// SignerLifetime of a delegated signing certificate (24 h); it is
	// replaced once older than SignerRenewAfter (16 h).
	SignerLifetime, SignerRenewAfter time.Duration
	// Validity is nextUpdate − thisUpdate of a response (1 h).
	Validity time.Duration
	Now      func() time.Time
	Logger   *slog.Logger
	// NonceRate bounds the responses signed for a request's nonce (each
	// costs a signature): past it (and NonceBurst), the nonce is ignored,
	// as RFC 5019 allows, and the cached response is served. Zero: 200/s,
	// burst 400.
	NonceRate  rate.Limit
	NonceBurst int
	// Count, if set, counts each answer by status ("good", "revoked",
	// "unknown", "malformed", "unauthorized", "internal").
	Count func(status string)
}

// Responder answers OCSP requests. It is an http.Handler.
type Responder struct {
	cfg Config

	nonces *rate.Limiter

	mu      sync.Mutex
	signers map[string]*signer // by issuer key hash (SHA-256 hex)
	cache   map[cacheKey]*cached
}

type signer struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	created time.Time
}

type cacheKey struct {
	issuer string
	serial string
	st     Status
}

type cached struct {
	der                    []byte
	thisUpdate, nextUpdate time.Time
	signer                 *x509.Certificate
	etag                   string
}

// New returns a responder.
func New(cfg Config) (*Responder, error) {
	if cfg.Issuers == nil || cfg.Source == nil {
		return nil, errors.New("ocsp: Issuers and Source are required")
	}
	if cfg.SignerLifetime == 0 {
		cfg.SignerLifetime = DefaultSignerLifetime
	}
	if cfg.SignerRenewAfter == 0 {
		cfg.SignerRenewAfter = DefaultSignerRenewAfter
	}
	if cfg.SignerRenewAfter >= cfg.SignerLifetime {
		return nil, errors.New("ocsp: SignerRenewAfter must be shorter than SignerLifetime")
	}
	if cfg.Validity == 0 {
		cfg.Validity = DefaultValidity
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Count == nil {
		cfg.Count = func(string) {}
	}
	if cfg.NonceRate == 0 {
		cfg.NonceRate, cfg.NonceBurst = 200, 400
	}
	return &Responder{cfg: cfg, nonces: rate.NewLimiter(cfg.NonceRate, max(cfg.NonceBurst, 1)),
		signers: map[string]*signer{}, cache: map[cacheKey]*cached{}}, nil
}

func issuerID(c *x509.Certificate) string {
	s := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(s[:])
}

// signerFor returns the current delegated signer of iss, creating or
// replacing it when due. Caller holds r.mu.
func (r *Responder) signerFor(iss Issuer, now time.Time) (*signer, error) {
	id := issuerID(iss.Cert)
	s := r.signers[id]
	if s != nil && now.Sub(s.created) < r.cfg.SignerRenewAfter && now.Before(s.cert.NotAfter) {
		return s, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial := make([]byte, 16)
	if _, err := rand.Read(serial); err != nil {
		return nil, err
	}
	serial[0] &= 0x7f
	notAfter := now.Add(r.cfg.SignerLifetime)
	if notAfter.After(iss.Cert.NotAfter) {
		notAfter = iss.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: new(big.Int).SetBytes(serial),
		Subject:      pkix.Name{Organization: []string{"fleetgate"}, CommonName: "fleetgate OCSP signer for " + iss.Cert.Subject.CommonName},
		NotBefore:    now.Add(-5 * time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageOCSPSigning},
		// id-pkix-ocsp-nocheck: clients need not check the signer's own
		// revocation (it lives a day).
		ExtraExtensions: []pkix.Extension{{Id: oidNoCheck, Value: []byte{0x05, 0x00}}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, iss.Cert, key.Public(), iss.Signer)
	if err != nil {
		return nil, fmt.Errorf("ocsp: certify a signer with %q: %w", iss.Cert.Subject.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	r.cfg.Logger.Info("OCSP signer certificate created", "issuer", iss.Cert.Subject.CommonName,
		"serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	s = &signer{cert: cert, key: key, created: now}
	r.signers[id] = s
	return s, nil
}

// Signers makes sure every trusted issuer has a current delegated signer
// (replacing those due) and returns their certificates. The metrics call it,
// so signers are renewed even when no request comes.
func (r *Responder) Signers() ([]*x509.Certificate, error) {
	now := r.cfg.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*x509.Certificate
	var errs []error
	live := map[string]bool{}
	for _, iss := range r.cfg.Issuers() {
		s, err := r.signerFor(iss, now)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		live[issuerID(iss.Cert)] = true
		out = append(out, s.cert)
	}
	for id := range r.signers {
		if !live[id] {
			delete(r.signers, id) // a retired CA
		}
	}
	return out, errors.Join(errs...)
}

// tbs parts of a request that x/crypto/ocsp does not return.
type rawRequest struct {
	TBS struct {
		Version       int           `asn1:"explicit,tag:0,default:0,optional"`
		RequestorName asn1.RawValue `asn1:"explicit,tag:1,optional"`
		RequestList   []asn1.RawValue
		Extensions    []pkix.Extension `asn1:"explicit,tag:2,optional"`
	}
	Signature asn1.RawValue `asn1:"explicit,tag:0,optional"`
}

// Respond answers one DER request: the DER response and the status it
// says ("good", "revoked", "unknown", "malformed", "unauthorized",
// "internal").
func (r *Responder) Respond(der []byte) (resp []byte, status string) {
	resp, status, _ = r.respond(der)
	return resp, status
}

// respond is Respond, with the cache entry of a response that may be
// cached (no nonce).
func (r *Responder) respond(der []byte) (resp []byte, status string, cacheable *cached) {
	req, err := xocsp.ParseRequest(der)
	var raw rawRequest
	if err == nil {
		if _, err = asn1.Unmarshal(der, &raw); err == nil && len(raw.TBS.RequestList) != 1 {
			err = errors.New("one certificate per request")
		}
	}
	if err != nil || req.SerialNumber == nil {
		return xocsp.MalformedRequestErrorResponse, "malformed", nil
	}
	var nonce *pkix.Extension
	for i, e := range raw.TBS.Extensions {
		if e.Id.Equal(oidNonce) {
			if len(e.Value) > 40 {
				return xocsp.MalformedRequestErrorResponse, "malformed", nil
			}
			nonce = &raw.TBS.Extensions[i]
		}
	}
	iss, ok := r.match(req)
	if !ok {
		return xocsp.UnauthorizedErrorResponse, "unauthorized", nil
	}
	if nonce != nil && !r.nonces.Allow() {
		nonce = nil // over the nonce budget: the cached answer
	}
	st := r.cfg.Source.Status(iss.Cert, req.SerialNumber)
	if st.Status == Revoked {
		st.RevokedAt = st.RevokedAt.UTC().Truncate(time.Second)
	}
	label := map[int]string{Good: "good", Revoked: "revoked", Unknown: "unknown"}[st.Status]
	now := r.cfg.Now()

	r.mu.Lock()
	defer r.mu.Unlock()
	s, err := r.signerFor(iss, now)
	if err != nil {
		r.cfg.Logger.Error("OCSP signer", "err", err)
		return xocsp.InternalErrorErrorResponse, "internal", nil
	}
	key := cacheKey{issuer: issuerID(iss.Cert) + req.HashAlgorithm.String(), serial: req.SerialNumber.String(), st: st}
	if nonce == nil {
		if c := r.cache[key]; c != nil && c.signer == s.cert && now.Before(c.thisUpdate.Add(r.cfg.Validity/2)) {
			return c.der, label, c
		}
	}
	thisUpdate := now.UTC().Truncate(time.Second)
	tmpl := xocsp.Response{
		Status: st.Status, SerialNumber: req.SerialNumber, IssuerHash: req.HashAlgorithm,
		ThisUpdate: thisUpdate, NextUpdate: thisUpdate.Add(r.cfg.Validity),
		RevokedAt: st.RevokedAt, RevocationReason: st.Reason,
		Certificate: s.cert,
	}
	out, err := xocsp.CreateResponse(iss.Cert, s.cert, tmpl, s.key)
	if err == nil && nonce != nil {
		out, err = withResponseExtensions(out, s.key, []pkix.Extension{{Id: oidNonce, Value: nonce.Value}})
	}
	if err != nil {
		r.cfg.Logger.Error("OCSP response", "err", err)
		return xocsp.InternalErrorErrorResponse, "internal", nil
	}
	c := &cached{der: out, thisUpdate: thisUpdate, nextUpdate: tmpl.NextUpdate, signer: s.cert}
	sum := sha1.Sum(out)
	c.etag = `"` + hex.EncodeToString(sum[:]) + `"`
	if nonce == nil {
		if len(r.cache) >= maxCache {
			clear(r.cache)
		}
		r.cache[key] = c
		return out, label, c
	}
	return out, label, nil
}

// match finds the trusted issuer whose name and key hashes the request
// carries.
func (r *Responder) match(req *xocsp.Request) (Issuer, bool) {
	if !req.HashAlgorithm.Available() {
		return Issuer{}, false
	}
	for _, iss := range r.cfg.Issuers() {
		var spki struct {
			Algorithm pkix.AlgorithmIdentifier
			PublicKey asn1.BitString
		}
		if _, err := asn1.Unmarshal(iss.Cert.RawSubjectPublicKeyInfo, &spki); err != nil {
			continue
		}
		h := req.HashAlgorithm.New()
		h.Write(iss.Cert.RawSubject)
		nameHash := h.Sum(nil)
		h.Reset()
		h.Write(spki.PublicKey.RightAlign())
		if bytes.Equal(nameHash, req.IssuerNameHash) && bytes.Equal(h.Sum(nil), req.IssuerKeyHash) {
			return iss, true
		}
	}
	return Issuer{}, false
}

// ServeHTTP serves GET {prefix}/{base64 request} and POST (any path).
func (r *Responder) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	var der []byte
	switch req.Method {
	case http.MethodPost:
		b, err := io.ReadAll(http.MaxBytesReader(w, req.Body, MaxRequestBytes))
		if err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				r.cfg.Count("malformed")
				http.Error(w, "OCSP request too large", http.StatusRequestEntityTooLarge)
				return
			}
			http.Error(w, "read error", http.StatusBadRequest)
			return
		}
		der = b
	case http.MethodGet:
		p := req.URL.EscapedPath()
		i := strings.Index(p, "/ocsp/")
		if i < 0 {
			http.Error(w, "GET /ocsp/{base64 DER request}", http.StatusNotFound)
			return
		}
		enc := p[i+len("/ocsp/"):]
		if len(enc) > MaxGETPath {
			r.cfg.Count("malformed")
			http.Error(w, "OCSP request too large", http.StatusRequestURITooLong)
			return
		}
		s, err := url.PathUnescape(enc)
		if err == nil {
			der, err = base64.StdEncoding.DecodeString(s)
		}
		if err != nil {
			der = nil // malformed below
		}
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	resp, status, c := r.respond(der)
	r.cfg.Count(status)
	h := w.Header()
	h.Set("Content-Type", "application/ocsp-response")
	if c == nil || req.Method != http.MethodGet {
		// POST responses and nonce responses are not for shared caches.
		h.Set("Cache-Control", "no-store")
	} else {
		// RFC 5019 section 6.
		now := r.cfg.Now()
		maxAge := int(c.nextUpdate.Sub(now).Seconds())
		if maxAge < 0 {
			maxAge = 0
		}
		h.Set("Cache-Control", "max-age="+strconv.Itoa(maxAge)+", public, no-transform, must-revalidate")
		h.Set("Last-Modified", c.thisUpdate.UTC().Format(http.TimeFormat))
		h.Set("Expires", c.nextUpdate.UTC().Format(http.TimeFormat))
		h.Set("ETag", c.etag)
		if inm := req.Header.Get("If-None-Match"); inm != "" && inm == c.etag {
			w.WriteHeader(http.StatusNotModified)
			return
		}
	}
	h.Set("Content-Length", strconv.Itoa(len(resp)))
	w.Write(resp)
}

// Staple returns a current OCSP response for cert (issued by one of the
// trusted issuers), for a TLS server to staple.
func (r *Responder) Staple(cert *x509.Certificate) ([]byte, error) {
	for _, iss := range r.cfg.Issuers() {
		if !bytes.Equal(cert.RawIssuer, iss.Cert.RawSubject) || cert.CheckSignatureFrom(iss.Cert) != nil {
			continue
		}
		reqDER, err := xocsp.CreateRequest(cert, iss.Cert, &xocsp.RequestOptions{Hash: crypto.SHA1})
		if err != nil {
			return nil, err
		}
		resp, status := r.Respond(reqDER)
		if status != "good" {
			return nil, fmt.Errorf("ocsp: staple for %s: status %s", cert.Subject.CommonName, status)
		}
		return resp, nil
	}
	return nil, fmt.Errorf("ocsp: staple: %s is not issued by a trusted issuing CA", cert.Subject.CommonName)
}

// ---- responseExtensions ----

type responseASN1 struct {
	Status   asn1.Enumerated
	Response struct {
		ResponseType asn1.ObjectIdentifier
		Response     []byte
	} `asn1:"explicit,tag:0,optional"`
}

type basicResponseASN1 struct {
	TBSResponseData    asn1.RawValue
	SignatureAlgorithm pkix.AlgorithmIdentifier
	Signature          asn1.BitString
	Certificates       []asn1.RawValue `asn1:"explicit,tag:0,optional"`
}

// withResponseExtensions adds responseExtensions ([1] EXPLICIT
// Extensions) to the ResponseData of a response made by x/crypto/ocsp and
// signs it again with key (the same signer, ECDSA with SHA-256).
func withResponseExtensions(der []byte, key crypto.Signer, exts []pkix.Extension) ([]byte, error) {
	var outer responseASN1
	if _, err := asn1.Unmarshal(der, &outer); err != nil {
		return nil, err
	}
	var basic basicResponseASN1
	if _, err := asn1.Unmarshal(outer.Response.Response, &basic); err != nil {
		return nil, err
	}
	extDER, err := asn1.Marshal(exts)
	if err != nil {
		return nil, err
	}
	tagged, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 1, IsCompound: true, Bytes: extDER})
	if err != nil {
		return nil, err
	}
	tbs, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true,
		Bytes: append(bytes.Clone(basic.TBSResponseData.Bytes), tagged...)})
	if err != nil {
		return nil, err
	}
	if !basic.SignatureAlgorithm.Algorithm.Equal(asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}) {
		return nil, errors.New("ocsp: responseExtensions need an ecdsa-with-SHA256 signer")
	}
	sum := sha256.Sum256(tbs)
	sig, err := key.Sign(rand.Reader, sum[:], crypto.SHA256)
	if err != nil {
		return nil, err
	}
	basic.TBSResponseData = asn1.RawValue{FullBytes: tbs}
	basic.Signature = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	basicDER, err := asn1.Marshal(basic)
	if err != nil {
		return nil, err
	}
	outer.Response.Response = basicDER
	return asn1.Marshal(outer)
}
