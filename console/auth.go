package console

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/identity"
)

// Sign-in links and browser sessions.
//
// A link is https://<console>/login?t=<id>.<secret>: the id finds the
// record, which keeps only SHA-256(secret); the secret's hash is compared
// in constant time, and the record is deleted at the first use, right or
// wrong. A session is a random cookie value, kept as its SHA-256; it holds
// the operator, the serial of the operator certificate that minted the
// link (a revoked certificate ends the session), the CSRF token and a
// channel closed when it ends (its event streams end with it).

// CookieName is the session cookie: __Host- makes the browser keep it
// only if Secure, Path=/ and without Domain.
const CookieName = "__Host-fleetgate-console"

var (
	errLinksFull = errors.New("too many sign-in links not used yet; try again in a minute")
	errNoSession = errors.New("not signed in")
)

type link struct {
	hash    [sha256.Size]byte
	op      identity.Identity
	serial  string
	expires time.Time
}

type session struct {
	op      identity.Identity
	serial  string
	csrf    string
	expires time.Time
	done    chan struct{} // closed when the session ends
	streams int           // live event streams (hub)
}

type auth struct {
	opt Options
	reg *registry.Registry

	mu       sync.Mutex
	baseURL  string
	links    map[string]*link    // by link id
	sessions map[string]*session // by SHA-256 of the cookie value, base64
	// signIns limits attempts to redeem links (all sources together).
	signIns *rate.Limiter
}

func newAuth(o Options, reg *registry.Registry, baseURL string) *auth {
	return &auth{opt: o, reg: reg, baseURL: baseURL, links: map[string]*link{}, sessions: map[string]*session{},
		signIns: rate.NewLimiter(10, 20)}
}

func (a *auth) setBaseURL(u string) {
	a.mu.Lock()
	a.baseURL = u
	a.mu.Unlock()
}

func randomText(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func hashKey(s string) string {
	h := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(h[:])
}

// mint makes a one-time link for op.
func (a *auth) mint(op identity.Identity, serial string) (api.ConsoleLoginResponse, error) {
	now := a.opt.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	for id, l := range a.links {
		if !now.Before(l.expires) {
			delete(a.links, id)
		}
	}
	if len(a.links) >= a.opt.MaxLinks {
		return api.ConsoleLoginResponse{}, errLinksFull
	}
	id, secret := randomText(9), randomText(32)
	l := &link{hash: sha256.Sum256([]byte(secret)), op: op, serial: serial, expires: now.Add(a.opt.LinkTTL)}
	a.links[id] = l
	return api.ConsoleLoginResponse{URL: a.baseURL + "/login?t=" + id + "." + secret, ExpiresAt: l.expires.UTC(), Operator: op.String()}, nil
}

// redeem spends a link and opens a session: it returns the cookie value.
func (a *auth) redeem(token string) (string, *session, error) {
	bad := errors.New("this sign-in link is not valid: it was used already, it expired, or it was mistyped; run `fleetgate console login` again")
	if !a.signIns.Allow() {
		return "", nil, errors.New("too many sign-in attempts; wait a few seconds")
	}
	id, secret, ok := strings.Cut(token, ".")
	if !ok || len(token) > 128 {
		return "", nil, bad
	}
	now := a.opt.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	l, ok := a.links[id]
	if !ok {
		return "", nil, bad
	}
	delete(a.links, id) // single use, whatever the outcome
	h := sha256.Sum256([]byte(secret))
	if subtle.ConstantTimeCompare(h[:], l.hash[:]) != 1 || !now.Before(l.expires) {
		return "", nil, bad
	}
	value := randomText(32)
	s := &session{op: l.op, serial: l.serial, csrf: randomText(32), expires: now.Add(a.opt.SessionTTL), done: make(chan struct{})}
	for k, old := range a.sessions { // forget ended sessions
		if !now.Before(old.expires) {
			a.endLocked(k, old)
		}
	}
	a.sessions[hashKey(value)] = s
	return value, s, nil
}

// session returns the live session of r's cookie.
func (a *auth) session(r *http.Request) (string, *session, error) {
	c, err := r.Cookie(CookieName)
	if err != nil || c.Value == "" || len(c.Value) > 128 {
		return "", nil, errNoSession
	}
	return a.byKey(hashKey(c.Value))
}

// byKey returns the session stored under k if it is still good: not
// expired, its operator certificate not revoked. A session that is not
// good any more is ended.
func (a *auth) byKey(k string) (string, *session, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.sessions[k]
	if !ok {
		return "", nil, errNoSession
	}
	if !a.opt.Now().Before(s.expires) {
		a.endLocked(k, s)
		return "", nil, errNoSession
	}
	// The certificate that minted the link must still be good.
	if st, ok := a.reg.CertStatus(s.serial); !ok || st.Revoked {
		a.endLocked(k, s)
		return "", nil, errNoSession
	}
	return k, s, nil
}

// end ends the session stored under k (logout).
func (a *auth) end(k string) {
	a.mu.Lock()
	if s, ok := a.sessions[k]; ok {
		a.endLocked(k, s)
	}
	a.mu.Unlock()
}

func (a *auth) endLocked(k string, s *session) {
	delete(a.sessions, k)
	close(s.done)
}

// checkCSRF is the check of every POST: the Origin header is the
// console's own (https and the request's host, or the origin of the
// configured console URL), and the token is the
// session's (header X-CSRF-Token or form field csrf), compared in
// constant time.
func (a *auth) checkCSRF(r *http.Request, s *session) error {
	o := r.Header.Get("Origin")
	a.mu.Lock()
	base := a.baseURL
	a.mu.Unlock()
	// The console's origin: the request's own, or that of its configured
	// URL (a reverse proxy that rewrites Host).
	if o == "" || o != "https://"+r.Host && o != originOf(base) {
		return errors.New("cross-origin request refused (Origin " + quoteShort(o) + ")")
	}
	tok := r.Header.Get("X-CSRF-Token")
	if tok == "" {
		tok = r.PostFormValue("csrf")
	}
	if subtle.ConstantTimeCompare([]byte(tok), []byte(s.csrf)) != 1 {
		return errors.New("missing or wrong CSRF token; reload the page")
	}
	return nil
}

// originOf is the scheme://host[:port] of a URL ("" if it has none).
func originOf(u string) string {
	p, err := url.Parse(u)
	if err != nil || p.Scheme == "" || p.Host == "" {
		return ""
	}
	return p.Scheme + "://" + p.Host
}

func quoteShort(s string) string {
	if s == "" {
		return "missing"
	}
	if len(s) > 80 {
		s = s[:80]
	}
	return "\"" + s + "\""
}

func setSessionCookie(w http.ResponseWriter, value string, ttl time.Duration) {
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: value, Path: "/", MaxAge: int(ttl / time.Second),
		Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
}

func clearSessionCookie(w http.ResponseWriter) {
	http.SetCookie(w, &http.Cookie{Name: CookieName, Value: "", Path: "/", MaxAge: -1,
		Secure: true, HttpOnly: true, SameSite: http.SameSiteStrictMode})
}
