package ocsp_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	xocsp "golang.org/x/crypto/ocsp"

	"github.com/fleetgate/fleetgate/enroll/ocsp"
)

type pki struct {
	root, issuing *x509.Certificate
	issKey        *ecdsa.PrivateKey
	n             int64
}

func newCert(t *testing.T, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	now := time.Now()
	rk, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rt := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " root"}, NotBefore: now.Add(-time.Hour),
		NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	root := newCert(t, rt, rt, rk.Public(), rk)
	ik, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	it := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name + " issuing"}, NotBefore: now.Add(-time.Hour),
		NotAfter: now.Add(47 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	return &pki{root: root, issuing: newCert(t, it, root, ik.Public(), rk), issKey: ik, n: 100}
}

func (p *pki) leaf(t *testing.T, cn string) *x509.Certificate {
	p.n++
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	return newCert(t, &x509.Certificate{SerialNumber: big.NewInt(p.n), Subject: pkix.Name{CommonName: cn}, NotBefore: now.Add(-time.Hour),
		NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		p.issuing, k.Public(), p.issKey)
}

// statuses is a Source the tests change.
type statuses struct {
	mu sync.Mutex
	m  map[string]ocsp.Status
}

func (s *statuses) set(c *x509.Certificate, st ocsp.Status) {
	s.mu.Lock()
	s.m[c.SerialNumber.String()] = st
	s.mu.Unlock()
}

func (s *statuses) Status(_ *x509.Certificate, serial *big.Int) ocsp.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.m[serial.String()]; ok {
		return st
	}
	return ocsp.Status{Status: ocsp.Unknown}
}

type fixture struct {
	p     *pki
	src   *statuses
	r     *ocsp.Responder
	url   string
	clock *clock
	count map[string]int
	cmu   sync.Mutex
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{p: newPKI(t, "test"), src: &statuses{m: map[string]ocsp.Status{}}, clock: &clock{t: time.Now()}, count: map[string]int{}}
	r, err := ocsp.New(ocsp.Config{
		Issuers: func() []ocsp.Issuer { return []ocsp.Issuer{{Cert: f.p.issuing, Signer: f.p.issKey}} },
		Source:  f.src, Now: f.clock.now,
		Count: func(s string) { f.cmu.Lock(); f.count[s]++; f.cmu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	f.r = r
	mux := http.NewServeMux()
	mux.Handle("/ocsp", r)
	mux.Handle("/ocsp/", r)
	srv := httptest.NewServer(mux) // 127.0.0.1
	t.Cleanup(srv.Close)
	f.url = srv.URL + "/ocsp"
	return f
}

func writePEM(t *testing.T, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	var b bytes.Buffer
	for _, c := range certs {
		pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// opensslOCSP asks the live responder with `openssl ocsp` (POST, with a
// nonce) and returns its output; it must verify the response and the nonce.
func opensslOCSP(t *testing.T, f *fixture, leaf *x509.Certificate) string {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
			t.Fatal("openssl is not installed (and FLEETGATE_REQUIRE_TOOLS is set)")
		}
		t.Skip("openssl not installed")
	}
	dir := t.TempDir()
	cmd := exec.Command("openssl", "ocsp", "-issuer", writePEM(t, dir, "issuing.pem", f.p.issuing),
		"-cert", writePEM(t, dir, "leaf.pem", leaf), "-url", f.url,
		"-CAfile", writePEM(t, dir, "ca.pem", f.p.root, f.p.issuing), "-resp_text")
	out, err := cmd.CombinedOutput()
	s := string(out)
	if err != nil {
		t.Fatalf("openssl ocsp: %v\n%s", err, s)
	}
	if !strings.Contains(s, "Response verify OK") {
		t.Fatalf("openssl did not verify the response:\n%s", s)
	}
	if strings.Contains(strings.ToLower(s), "nonce verify error") || strings.Contains(s, "WARNING: no nonce in response") {
		t.Fatalf("openssl did not verify the nonce:\n%s", s)
	}
	if !strings.Contains(s, "OCSP Nonce") {
		t.Fatalf("no nonce echoed in the response:\n%s", s)
	}
	return s
}

func TestOCSPOpenSSLClient(t *testing.T) {
	f := newFixture(t)
	good, revoked, never := f.p.leaf(t, "good"), f.p.leaf(t, "revoked"), f.p.leaf(t, "never-issued")
	f.src.set(good, ocsp.Status{Status: ocsp.Good})
	f.src.set(revoked, ocsp.Status{Status: ocsp.Revoked, RevokedAt: time.Now().Add(-time.Minute), Reason: 1})

	if out := opensslOCSP(t, f, good); !strings.Contains(out, "leaf.pem: good") {
		t.Fatalf("good:\n%s", out)
	}
	if out := opensslOCSP(t, f, revoked); !strings.Contains(out, "leaf.pem: revoked") || !strings.Contains(out, "Reason: keyCompromise") {
		t.Fatalf("revoked:\n%s", out)
	}
	if out := opensslOCSP(t, f, never); !strings.Contains(out, "leaf.pem: unknown") {
		t.Fatalf("unknown:\n%s", out)
	}
	// A revocation shows at once (a good answer was just given).
	f.src.set(good, ocsp.Status{Status: ocsp.Revoked, RevokedAt: time.Now()})
	if out := opensslOCSP(t, f, good); !strings.Contains(out, "leaf.pem: revoked") {
		t.Fatalf("after revocation:\n%s", out)
	}
	// A suspended device's certificate: on hold, not good.
	f.src.set(good, ocsp.Status{Status: ocsp.Revoked, RevokedAt: time.Now(), Reason: ocsp.ReasonCertificateHold})
	if out := opensslOCSP(t, f, good); !strings.Contains(out, "leaf.pem: revoked") || !strings.Contains(out, "Reason: certificateHold") {
		t.Fatalf("suspended:\n%s", out)
	}
	if f.count["good"] != 1 || f.count["revoked"] != 3 || f.count["unknown"] != 1 {
		t.Fatalf("counted %v", f.count)
	}
}

func get(t *testing.T, u string, hdr map[string]string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestOCSPGETAndCachingHeaders(t *testing.T) {
	f := newFixture(t)
	leaf := f.p.leaf(t, "dev")
	f.src.set(leaf, ocsp.Status{Status: ocsp.Good})
	reqDER, err := xocsp.CreateRequest(leaf, f.p.issuing, &xocsp.RequestOptions{Hash: crypto.SHA256})
	if err != nil {
		t.Fatal(err)
	}
	u := f.url + "/" + url.PathEscape(base64.StdEncoding.EncodeToString(reqDER))
	resp := get(t, u, nil)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/ocsp-response" {
		t.Fatalf("GET: %d %v", resp.StatusCode, resp.Header)
	}
	r, err := xocsp.ParseResponseForCert(body, leaf, f.p.issuing)
	if err != nil || r.Status != xocsp.Good {
		t.Fatalf("GET response: %v %+v", err, r)
	}
	cc := resp.Header.Get("Cache-Control")
	if !strings.HasPrefix(cc, "max-age=") || !strings.Contains(cc, "public") || !strings.Contains(cc, "must-revalidate") ||
		resp.Header.Get("ETag") == "" || resp.Header.Get("Last-Modified") == "" || resp.Header.Get("Expires") == "" {
		t.Fatalf("RFC 5019 headers missing: %v", resp.Header)
	}
	// The same answer again, and 304 for a cache that holds it.
	resp2 := get(t, u, nil)
	body2, _ := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	if !bytes.Equal(body, body2) {
		t.Fatal("a nonce-less GET was signed again instead of served from the cache")
	}
	resp3 := get(t, u, map[string]string{"If-None-Match": resp.Header.Get("ETag")})
	resp3.Body.Close()
	if resp3.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %d, want 304", resp3.StatusCode)
	}
	// A revocation changes the answer at once, also for GET.
	f.src.set(leaf, ocsp.Status{Status: ocsp.Revoked, RevokedAt: time.Now()})
	resp4 := get(t, u, map[string]string{"If-None-Match": resp.Header.Get("ETag")})
	body4, _ := io.ReadAll(resp4.Body)
	resp4.Body.Close()
	if r, err := xocsp.ParseResponseForCert(body4, leaf, f.p.issuing); resp4.StatusCode != 200 || err != nil || r.Status != xocsp.Revoked {
		t.Fatalf("after revocation: %d %v", resp4.StatusCode, err)
	}
}

func post(t *testing.T, u string, body []byte) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.Post(u, "application/ocsp-request", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}

func TestOCSPMalformedUnauthorizedOversize(t *testing.T) {
	f := newFixture(t)
	leaf := f.p.leaf(t, "dev")
	f.src.set(leaf, ocsp.Status{Status: ocsp.Good})
	wantErr := func(name string, body []byte, want xocsp.ResponseStatus) {
		t.Helper()
		_, err := xocsp.ParseResponse(body, nil)
		re, ok := err.(xocsp.ResponseError)
		if !ok || re.Status != want {
			t.Errorf("%s: %v, want %v", name, err, want)
		}
	}
	_, b := post(t, f.url, []byte("not DER at all"))
	wantErr("garbage", b, xocsp.Malformed)
	_, b = post(t, f.url, nil)
	wantErr("empty", b, xocsp.Malformed)
	resp := get(t, f.url+"/!!not-base64!!", nil)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	wantErr("bad GET encoding", b, xocsp.Malformed)

	// Another CA's certificate: not ours to answer.
	other := newPKI(t, "other")
	foreign, _ := xocsp.CreateRequest(other.leaf(t, "x"), other.issuing, nil)
	_, b = post(t, f.url, foreign)
	wantErr("foreign issuer", b, xocsp.Unauthorized)

	// Bounded sizes.
	if resp, _ := post(t, f.url, bytes.Repeat([]byte{0x30}, ocsp.MaxRequestBytes+1)); resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversize POST: %d, want 413", resp.StatusCode)
	}
	resp = get(t, f.url+"/"+strings.Repeat("A", ocsp.MaxGETPath+4), nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestURITooLong {
		t.Errorf("oversize GET: %d, want 414", resp.StatusCode)
	}
	// Still answers properly after all that.
	good, _ := xocsp.CreateRequest(leaf, f.p.issuing, nil)
	_, b = post(t, f.url, good)
	if r, err := xocsp.ParseResponseForCert(b, leaf, f.p.issuing); err != nil || r.Status != xocsp.Good {
		t.Fatalf("good after abuse: %v", err)
	}
	if f.count["malformed"] < 5 || f.count["unauthorized"] != 1 {
		t.Fatalf("counted %v", f.count)
	}
}

var oidNoCheck = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 48, 1, 5}

func TestOCSPSignerRotates(t *testing.T) {
	f := newFixture(t)
	leaf := f.p.leaf(t, "dev")
	f.src.set(leaf, ocsp.Status{Status: ocsp.Good})
	ask := func() *x509.Certificate {
		t.Helper()
		reqDER, _ := xocsp.CreateRequest(leaf, f.p.issuing, nil)
		der, status := f.r.Respond(reqDER)
		if status != "good" {
			t.Fatalf("status %s", status)
		}
		r, err := xocsp.ParseResponseForCert(der, leaf, f.p.issuing)
		if err != nil || r.Certificate == nil {
			t.Fatalf("parse: %v", err)
		}
		return r.Certificate
	}
	first := ask()
	hasNoCheck := false
	for _, e := range first.Extensions {
		hasNoCheck = hasNoCheck || e.Id.Equal(oidNoCheck)
	}
	if !hasNoCheck || len(first.ExtKeyUsage) != 1 || first.ExtKeyUsage[0] != x509.ExtKeyUsageOCSPSigning ||
		first.NotAfter.Sub(first.NotBefore) > 25*time.Hour || first.IsCA {
		t.Fatalf("signer certificate: nocheck %v EKU %v life %v", hasNoCheck, first.ExtKeyUsage, first.NotAfter.Sub(first.NotBefore))
	}
	if err := first.CheckSignatureFrom(f.p.issuing); err != nil {
		t.Fatal(err)
	}
	f.clock.add(15 * time.Hour)
	if c := ask(); !c.Equal(first) {
		t.Fatal("signer replaced too early")
	}
	f.clock.add(2 * time.Hour) // 17 h: due, 7 h before it expires
	second := ask()
	if second.Equal(first) || !second.NotAfter.After(first.NotAfter) {
		t.Fatal("signer not replaced after 16 h")
	}
	// Signers (what the metrics read) renews without a request, too.
	f.clock.add(17 * time.Hour)
	certs, err := f.r.Signers()
	if err != nil || len(certs) != 1 || certs[0].Equal(second) {
		t.Fatalf("Signers did not renew: %v", err)
	}
}

// Two trusted issuing CAs (a rotation's overlap): each gets its own
// delegated signer, and the list is read per request, so a CA dropped from
// it is no longer answered for.
func TestOCSPServesSeveralIssuingCAs(t *testing.T) {
	a, b := newPKI(t, "old"), newPKI(t, "new")
	b.n = 500 // distinct serials for the test's source
	trusted := []ocsp.Issuer{{Cert: a.issuing, Signer: a.issKey}, {Cert: b.issuing, Signer: b.issKey}}
	var mu sync.Mutex
	src := &statuses{m: map[string]ocsp.Status{}}
	r, err := ocsp.New(ocsp.Config{Source: src, Issuers: func() []ocsp.Issuer {
		mu.Lock()
		defer mu.Unlock()
		return append([]ocsp.Issuer(nil), trusted...)
	}})
	if err != nil {
		t.Fatal(err)
	}
	la, lb := a.leaf(t, "on-old"), b.leaf(t, "on-new")
	src.set(la, ocsp.Status{Status: ocsp.Good})
	src.set(lb, ocsp.Status{Status: ocsp.Revoked, RevokedAt: time.Now()})
	ask := func(leaf, iss *x509.Certificate) (*xocsp.Response, string) {
		reqDER, _ := xocsp.CreateRequest(leaf, iss, nil)
		der, status := r.Respond(reqDER)
		if status == "unauthorized" {
			return nil, status
		}
		resp, err := xocsp.ParseResponseForCert(der, leaf, iss)
		if err != nil {
			t.Fatalf("%s: %v", status, err)
		}
		return resp, status
	}
	ra, sa := ask(la, a.issuing)
	rb, sb := ask(lb, b.issuing)
	if sa != "good" || sb != "revoked" || ra.Certificate.Equal(rb.Certificate) ||
		ra.Certificate.CheckSignatureFrom(a.issuing) != nil || rb.Certificate.CheckSignatureFrom(b.issuing) != nil {
		t.Fatalf("two CAs: %s %s", sa, sb)
	}
	if certs, err := r.Signers(); err != nil || len(certs) != 2 {
		t.Fatalf("Signers: %d %v", len(certs), err)
	}
	mu.Lock()
	trusted = trusted[1:] // the old CA retired
	mu.Unlock()
	if _, st := ask(la, a.issuing); st != "unauthorized" {
		t.Fatalf("retired CA: %s", st)
	}
	if certs, _ := r.Signers(); len(certs) != 1 {
		t.Fatalf("retired CA's signer kept: %d", len(certs))
	}
}

// withNonce adds a nonce extension to a request made by x/crypto/ocsp.
func withNonce(t *testing.T, reqDER, nonce []byte) []byte {
	t.Helper()
	type certID struct {
		HashAlgorithm pkix.AlgorithmIdentifier
		NameHash      []byte
		IssuerKeyHash []byte
		SerialNumber  *big.Int
	}
	var req struct {
		TBS struct {
			Version     int `asn1:"explicit,tag:0,default:0,optional"`
			RequestList []struct{ Cert certID }
			Extensions  []pkix.Extension `asn1:"explicit,tag:2,optional"`
		}
	}
	if _, err := asn1.Unmarshal(reqDER, &req); err != nil {
		t.Fatal(err)
	}
	v, _ := asn1.Marshal(nonce)
	req.TBS.Extensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 48, 1, 2}, Value: v}}
	out, err := asn1.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Each nonce costs a signature: past the budget the nonce is ignored and
// the cached answer served (RFC 5019), still a valid response.
func TestOCSPNonceBudget(t *testing.T) {
	p := newPKI(t, "budget")
	src := &statuses{m: map[string]ocsp.Status{}}
	r, err := ocsp.New(ocsp.Config{Source: src, NonceRate: 0.001, NonceBurst: 2,
		Issuers: func() []ocsp.Issuer { return []ocsp.Issuer{{Cert: p.issuing, Signer: p.issKey}} }})
	if err != nil {
		t.Fatal(err)
	}
	leaf := p.leaf(t, "dev")
	src.set(leaf, ocsp.Status{Status: ocsp.Good})
	plain, _ := xocsp.CreateRequest(leaf, p.issuing, nil)
	for i := range 4 {
		nonce := bytes.Repeat([]byte{byte(0xA0 + i)}, 16)
		der, status := r.Respond(withNonce(t, plain, nonce))
		if _, err := xocsp.ParseResponseForCert(der, leaf, p.issuing); err != nil || status != "good" {
			t.Fatalf("request %d: %s %v", i, status, err)
		}
		if echoed := bytes.Contains(der, nonce); echoed != (i < 2) {
			t.Fatalf("request %d: nonce echoed %v, want %v", i, echoed, i < 2)
		}
	}
}
