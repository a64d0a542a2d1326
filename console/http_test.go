package console_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/console"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// clock is a test clock the console reads (Options.Now).
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// env is a real server with the console on.
type env struct {
	g    *testenv.Gateway
	http *http.Client
	base string
}

func start(t *testing.T, o console.Options) *env {
	t.Helper()
	cfg := testenv.Config(t, testenv.Options{})
	cfg.ConsoleAddr = "127.0.0.1:0"
	cfg.Console = o
	g := testenv.StartConfig(t, cfg)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots(), MinVersion: tls.VersionTLS12}}
	t.Cleanup(tr.CloseIdleConnections)
	hc := &http.Client{Transport: tr, Timeout: 20 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return &env{g: g, http: hc, base: "https://" + g.Addrs.Console}
}

func (e *env) link(t *testing.T) string {
	t.Helper()
	res, err := e.g.Admin.ConsoleLogin(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.URL, e.base+"/login?t=") {
		t.Fatalf("link %q does not start with %s", res.URL, e.base)
	}
	return res.URL
}

func (e *env) get(t *testing.T, u, cookie string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	if cookie != "" {
		req.Header.Set("Cookie", cookie)
	}
	resp, err := e.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// signIn opens a link and returns the session cookie and CSRF token.
func (e *env) signIn(t *testing.T) (cookie, csrf string) {
	t.Helper()
	resp, _ := e.get(t, e.link(t), "")
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("sign-in link: %s", resp.Status)
	}
	sc := resp.Header.Get("Set-Cookie")
	for _, want := range []string{console.CookieName + "=", "Path=/", "HttpOnly", "Secure", "SameSite=Strict", "Max-Age="} {
		if !strings.Contains(sc, want) {
			t.Errorf("session cookie %q lacks %s", sc, want)
		}
	}
	if strings.Contains(strings.ToLower(sc), "domain=") {
		t.Errorf("session cookie %q has a Domain", sc)
	}
	cookie = strings.SplitN(sc, ";", 2)[0]
	_, body := e.get(t, e.base+"/", cookie)
	m := regexp.MustCompile(`<meta name="csrf" content="([^"]+)">`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no CSRF token on the overview:\n%s", body)
	}
	return cookie, m[1]
}

func (e *env) post(t *testing.T, path, cookie, origin string, form url.Values, hdr map[string]string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, e.base+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Cookie", cookie)
	if origin != "" {
		req.Header.Set("Origin", origin)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestSignInLinksAreSingleUseAndShortLived(t *testing.T) {
	clk := &clock{}
	e := start(t, console.Options{Now: clk.now, LinkTTL: time.Minute, SessionTTL: 10 * time.Minute})

	// Not signed in: no page.
	if resp, body := e.get(t, e.base+"/", ""); resp.StatusCode != http.StatusUnauthorized || !strings.Contains(body, "fleetgate console login") {
		t.Fatalf("anonymous overview: %s", resp.Status)
	}
	// Security headers on every answer.
	resp, _ := e.get(t, e.base+"/", "")
	c := resp.Header.Get("Content-Security-Policy")
	if !strings.Contains(c, "script-src 'self'") || strings.Contains(c, "unsafe-inline") || strings.Contains(c, "unsafe-eval") {
		t.Errorf("CSP %q", c)
	}
	if resp.Header.Get("X-Content-Type-Options") != "nosniff" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Errorf("headers %v", resp.Header)
	}

	// A link works once.
	l := e.link(t)
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("first use: %s", resp.Status)
	}
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Set-Cookie") != "" {
		t.Fatalf("reused link: %s, cookie %q", resp.Status, resp.Header.Get("Set-Cookie"))
	}
	// A wrong secret spends the link too.
	l = e.link(t)
	if resp, _ := e.get(t, l[:len(l)-2]+"xx", ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong secret: %s", resp.Status)
	}
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("link after a wrong guess: %s", resp.Status)
	}
	// An expired link.
	l = e.link(t)
	clk.advance(61 * time.Second)
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("expired link: %s", resp.Status)
	}
	// A session ends after its life.
	cookie, _ := e.signIn(t)
	if resp, _ := e.get(t, e.base+"/devices", cookie); resp.StatusCode != http.StatusOK {
		t.Fatalf("devices: %s", resp.Status)
	}
	clk.advance(11 * time.Minute)
	if resp, _ := e.get(t, e.base+"/devices", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("expired session: %s", resp.Status)
	}
	// The sign-ins are audited with the operator's name.
	recs, err := e.g.Admin.Audit(context.Background(), "", 50)
	if err != nil {
		t.Fatal(err)
	}
	var links, logins int
	for _, r := range recs {
		switch r.Action {
		case "console.link":
			links++
		case "console.login":
			logins++
			if r.Actor != "operator/admin" {
				t.Errorf("login audited as %q", r.Actor)
			}
		}
	}
	if links != 4 || logins != 2 {
		t.Errorf("audited %d links, %d logins; want 4, 2", links, logins)
	}
}

func TestPostsNeedCSRFTokenAndOrigin(t *testing.T) {
	e := start(t, console.Options{})
	e.g.EnrollDevice(t, "dev-csrf", "lab")
	cookie, csrf := e.signIn(t)
	origin := e.base
	path := "/devices/dev-csrf/suspend"
	reason := url.Values{"reason": {"test"}}
	withToken := url.Values{"reason": {"test"}, "csrf": {csrf}}
	for _, c := range []struct {
		name   string
		origin string
		form   url.Values
		hdr    map[string]string
	}{
		{"no token", origin, reason, nil},
		{"wrong token", origin, url.Values{"reason": {"test"}, "csrf": {csrf + "x"}}, nil},
		{"foreign origin", "https://evil.example", withToken, nil},
		{"no origin", "", withToken, nil},
		{"null origin", "null", withToken, nil},
		{"foreign origin, header token", "https://evil.example", reason, map[string]string{"X-CSRF-Token": csrf}},
	} {
		if code, body := e.post(t, path, cookie, c.origin, c.form, c.hdr); code != http.StatusForbidden {
			t.Errorf("%s: %d %s", c.name, code, body)
		}
	}
	if d, _ := e.g.Admin.Device(context.Background(), "dev-csrf"); d.State != "active" {
		t.Fatalf("refused posts changed the device: %s", d.State)
	}
	// No session: no action.
	if code, _ := e.post(t, path, "", origin, withToken, nil); code != http.StatusUnauthorized {
		t.Errorf("without session: %d", code)
	}
	// A reason is required.
	if code, _ := e.post(t, path, cookie, origin, url.Values{"csrf": {csrf}}, nil); code != http.StatusBadRequest {
		t.Errorf("without reason: %d", code)
	}
	// Right: form post redirects, script post answers JSON.
	if code, _ := e.post(t, path, cookie, origin, withToken, nil); code != http.StatusSeeOther {
		t.Fatalf("suspend: %d", code)
	}
	code, body := e.post(t, "/devices/dev-csrf/resume", cookie, origin, reason, map[string]string{"X-CSRF-Token": csrf})
	if code != http.StatusOK || !strings.Contains(body, `"state":"active"`) {
		t.Fatalf("resume: %d %s", code, body)
	}
	recs, err := e.g.Admin.Audit(context.Background(), "dev-csrf", 10)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range recs {
		got = append(got, r.Action+" "+r.Actor+" "+r.Reason)
	}
	all := strings.Join(got, "\n")
	if !strings.Contains(all, "device.suspend operator/admin console: test") || !strings.Contains(all, "device.resume operator/admin console: test") {
		t.Errorf("audit:\n%s", all)
	}
	// Sign out ends the session.
	if code, _ := e.post(t, "/logout", cookie, origin, url.Values{"csrf": {csrf}}, nil); code != http.StatusOK {
		t.Fatalf("logout: %d", code)
	}
	if resp, _ := e.get(t, e.base+"/", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("after logout: %s", resp.Status)
	}
}

func TestReadOnlyOperatorCannotAct(t *testing.T) {
	var mu sync.Mutex
	role := console.RoleReadOnly
	e := start(t, console.Options{Role: func(identity.Identity) (console.Role, error) {
		mu.Lock()
		defer mu.Unlock()
		return role, nil
	}})
	e.g.EnrollDevice(t, "dev-ro", "lab")
	cookie, csrf := e.signIn(t)
	_, page := e.get(t, e.base+"/devices/dev-ro", cookie)
	if strings.Contains(page, "Revoke…") || !strings.Contains(page, "read-only") {
		t.Errorf("read-only page offers actions")
	}
	form := url.Values{"reason": {"nope"}, "csrf": {csrf}}
	if code, _ := e.post(t, "/devices/dev-ro/revoke", cookie, e.base, form, nil); code != http.StatusForbidden {
		t.Fatalf("read-only revoke: %d", code)
	}
	if d, _ := e.g.Admin.Device(context.Background(), "dev-ro"); d.State != "active" {
		t.Fatalf("read-only operator revoked: %s", d.State)
	}
	recs, _ := e.g.Admin.Audit(context.Background(), "dev-ro", 5)
	if len(recs) == 0 || recs[0].Action != "device.revoke" || recs[0].Outcome != "denied" {
		t.Errorf("denied revoke not audited: %+v", recs)
	}
	// The role is read on every request: promoted, the same session acts.
	mu.Lock()
	role = console.RoleAdmin
	mu.Unlock()
	if code, _ := e.post(t, "/devices/dev-ro/revoke", cookie, e.base, form, nil); code != http.StatusSeeOther {
		t.Fatalf("admin revoke: %d", code)
	}
}

// stream opens /events and returns a reader of its lines.
func (e *env) stream(t *testing.T, cookie string) (*http.Response, *bufio.Reader) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, e.base+"/events", nil)
	req.Header.Set("Cookie", cookie)
	resp, err := e.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp, bufio.NewReader(resp.Body)
}

// readUntil reads lines until one contains want (bounded).
func readUntil(r *bufio.Reader, want string) error {
	for range 200 {
		line, err := r.ReadString('\n')
		if strings.Contains(line, want) {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return errors.New("not seen: " + want)
}

func TestEventStreamsAreBounded(t *testing.T) {
	e := start(t, console.Options{MaxStreams: 3, MaxStreamsPerSession: 2, Heartbeat: 100 * time.Millisecond})
	a, csrfA := e.signIn(t)
	b, _ := e.signIn(t)
	r1, l1 := e.stream(t, a)
	r2, _ := e.stream(t, a)
	if r1.StatusCode != 200 || r2.StatusCode != 200 || r1.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("streams: %s %s", r1.Status, r2.Status)
	}
	if r3, _ := e.stream(t, a); r3.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("third stream of a session: %s", r3.Status)
	}
	if r, _ := e.stream(t, b); r.StatusCode != 200 {
		t.Fatalf("other session: %s", r.Status)
	}
	if r, _ := e.stream(t, b); r.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("stream over the global cap: %s", r.Status)
	}
	// Heartbeats on an idle stream, and events from the directory.
	if err := readUntil(l1, ": heartbeat"); err != nil {
		t.Fatal(err)
	}
	e.g.EnrollDevice(t, "dev-sse", "lab")
	if err := readUntil(l1, `"device":"dev-sse"`); err != nil {
		t.Fatal(err)
	}
	// Logout ends the session's streams.
	if code, _ := e.post(t, "/logout", a, e.base, url.Values{"csrf": {csrfA}}, nil); code != http.StatusOK {
		t.Fatalf("logout: %d", code)
	}
	if err := readUntil(l1, "event: end"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(l1); err != nil {
		t.Fatalf("stream after logout: %v", err)
	}
}

// Revoking the operator certificate that minted the link ends the
// session and its live stream.
func TestRevokedOperatorCertificateEndsSession(t *testing.T) {
	e := start(t, console.Options{Heartbeat: 100 * time.Millisecond})
	cookie, _ := e.signIn(t)
	_, l := e.stream(t, cookie)
	if err := readUntil(l, ": heartbeat"); err != nil {
		t.Fatal(err)
	}
	c, err := tls.LoadX509KeyPair(filepath.Join(e.g.DataDir, ca.OperatorCertFile), filepath.Join(e.g.DataDir, ca.OperatorKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.g.Admin.RevokeCertificate(context.Background(), fleet.SerialString(c.Leaf.SerialNumber), "key lost"); err != nil {
		t.Fatal(err)
	}
	if err := readUntil(l, "event: end"); err != nil {
		t.Fatal(err)
	}
	if resp, _ := e.get(t, e.base+"/", cookie); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("session of a revoked operator certificate: %s", resp.Status)
	}
}

// Links not used yet are bounded: the admin API answers 429 beyond.
func TestSignInLinksAreBounded(t *testing.T) {
	e := start(t, console.Options{MaxLinks: 3})
	var links []string
	for range 3 {
		links = append(links, e.link(t))
	}
	if _, err := e.g.Admin.ConsoleLogin(context.Background()); err == nil || !strings.Contains(err.Error(), "console_links_full") {
		t.Fatalf("fourth link: %v", err)
	}
	// A used link frees its place.
	if resp, _ := e.get(t, links[0], ""); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("link: %s", resp.Status)
	}
	e.link(t)
}
