package enroll_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

func client(g *testenv.Gateway, cert *tls.Certificate) *http.Client {
	tcfg := &tls.Config{RootCAs: g.Roots()}
	if cert != nil {
		tcfg.Certificates = []tls.Certificate{*cert}
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tcfg}}
}

func post(t *testing.T, g *testenv.Gateway, path, contentType string, body []byte) (int, api.Error) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, g.URL()+path, bytes.NewReader(body))
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := client(g, nil).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e api.Error
	if resp.StatusCode != http.StatusOK {
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("error body is not JSON: %q", b)
		}
	}
	return resp.StatusCode, e
}

func csrFor(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func enrollBody(t *testing.T, token, id string, csr []byte) []byte {
	b, err := json.Marshal(api.TokenEnrollRequest{Token: token, DeviceID: id, CSR: csr})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTokenEnrollmentRejectsBadInput(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	good := csrFor(t, testpki.NewKey(t))
	badSig := bytes.Clone(good)
	badSig[len(badSig)-5] ^= 0xff // inside the signature
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	used := g.Token(t, "dev-used", "lab", time.Hour)
	if code, e := post(t, g, api.PathEnrollToken, "application/json", enrollBody(t, used, "dev-used", good)); code != http.StatusOK {
		t.Fatalf("first use of token: %d %v", code, e)
	}
	expired := g.Token(t, "dev-expired", "lab", time.Nanosecond)
	otherDev := g.Token(t, "dev-other", "lab", time.Hour)
	fresh := func(id string) string { return g.Token(t, id, "lab", time.Hour) }

	cases := []struct {
		name   string
		device string // device that must end with no certificate
		ctype  string
		body   []byte
		status int
		code   string
	}{
		{"malformed JSON is refused", "", "application/json", []byte(`{"token": `), 400, "malformed_json"},
		{"an unknown JSON field is refused", "", "application/json", []byte(`{"tokn": "x"}`), 400, "malformed_json"},
		{"a body that is not JSON content is refused", "", "text/plain", []byte(`{}`), 415, "unsupported_media_type"},
		{"an oversized body is refused", "", "application/json", append([]byte(`{"token":"`), bytes.Repeat([]byte("A"), api.MaxBodyBytes+10)...), 413, "body_too_large"},
		{"an invalid device ID is refused", "", "application/json", enrollBody(t, fresh("dev-x"), "Dev_X/#", good), 400, "invalid_device_id"},
		{"a CSR that does not parse is refused", "dev-c1", "application/json", enrollBody(t, fresh("dev-c1"), "dev-c1", []byte("garbage")), 400, "csr_malformed"},
		{"a CSR with a bad signature is refused", "dev-c2", "application/json", enrollBody(t, fresh("dev-c2"), "dev-c2", badSig), 400, "csr_signature_invalid"},
		{"a CSR with an RSA-1024 key is refused", "dev-c3", "application/json", enrollBody(t, fresh("dev-c3"), "dev-c3", csrFor(t, rsa1024)), 400, "csr_key_not_allowed"},
		{"a malformed token is refused", "dev-t0", "application/json", enrollBody(t, "not-a-token", "dev-t0", good), 401, "token_invalid"},
		{"an unknown token is refused", "dev-t1", "application/json", enrollBody(t, "fgt_0011223344556677_"+strings.Repeat("A", 43), "dev-t1", good), 401, "token_unknown"},
		{"an expired token is refused", "dev-expired", "application/json", enrollBody(t, expired, "dev-expired", good), 401, "token_expired"},
		{"a reused token is refused", "", "application/json", enrollBody(t, used, "dev-used", csrFor(t, testpki.NewKey(t))), 401, "token_used"},
		{"a token minted for another device is refused", "dev-thief", "application/json", enrollBody(t, otherDev, "dev-thief", good), 403, "token_device_mismatch"},
		{"a right token ID with a wrong secret is refused", "dev-other", "application/json", enrollBody(t, otherDev[:len(otherDev)-4]+"AAAA", "dev-other", good), 401, "token_unknown"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, e := post(t, g, api.PathEnrollToken, tc.ctype, tc.body)
			if code != tc.status || e.Code != tc.code {
				t.Fatalf("got %d %q (%s), want %d %q", code, e.Code, e.Message, tc.status, tc.code)
			}
			if e.Message == "" {
				t.Error("error has no message")
			}
			if tc.device != "" {
				if d, err := g.Admin.Device(context.Background(), tc.device); err == nil && d.Serial != "" {
					t.Fatalf("device %s has certificate %s after a refused enrollment", tc.device, d.Serial)
				}
			}
		})
	}
	// Every refusal is in the audit log, with its reason.
	recs, err := g.Admin.Audit(context.Background(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	reasons := map[string]int{}
	for _, r := range recs {
		if r.Action == "enroll.token" && r.Outcome == "denied" {
			reasons[strings.SplitN(r.Reason, ":", 2)[0]]++
		}
	}
	for _, tc := range cases {
		if reasons[tc.code] == 0 {
			t.Errorf("no audit record of refusal %q (have %v)", tc.code, reasons)
		}
	}
	// The only device with a certificate is the one that used its token.
	ds, err := g.Admin.Devices(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ds {
		if d.ID != "dev-used" && d.Serial != "" {
			t.Errorf("device %s was issued %s", d.ID, d.Serial)
		}
	}
	// Metrics count failures by code.
	if m := g.Metrics(t); !strings.Contains(m, `fleetgate_enrollments_total{method="token",outcome="token_used"} 1`) {
		t.Errorf("metrics lack token_used failure:\n%s", grep(m, "fleetgate_enrollments_total"))
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestTokenIsSingleUseUnderConcurrency(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	tok := g.Token(t, "racer", "lab", time.Hour)
	const n = 16
	var wg sync.WaitGroup
	codes := make([]int, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := enrollBody(t, tok, "racer", csrFor(t, testpki.NewKey(t)))
			resp, err := client(g, nil).Post(g.URL()+api.PathEnrollToken, "application/json", bytes.NewReader(body))
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	ok := 0
	for _, c := range codes {
		if c == http.StatusOK {
			ok++
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent redemptions succeeded (codes %v), want exactly 1", ok, n, codes)
	}
}

func TestAdminAPIRequiresOperator(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	d := g.EnrollDevice(t, "dev-1", "lab")
	devCfg, _ := d.TLSConfig("localhost")
	devCert, _ := devCfg.GetClientCertificate(nil)
	svc := g.Service(t, "backend")
	body, _ := json.Marshal(api.TokenCreateRequest{DeviceID: "evil", Group: "lab"})
	for _, tc := range []struct {
		name   string
		cert   *tls.Certificate
		status int
	}{
		{"no client certificate is refused", nil, 401},
		{"a device certificate is refused", devCert, 403},
		{"a service certificate is refused", &svc, 403},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := client(g, tc.cert).Post(g.URL()+api.PathAdminTokens, "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("got %d, want %d", resp.StatusCode, tc.status)
			}
		})
	}
	// And the operator may.
	if _, err := g.Admin.CreateToken(context.Background(), api.TokenCreateRequest{DeviceID: "ok-dev", Group: "lab"}); err != nil {
		t.Fatal(err)
	}
}
