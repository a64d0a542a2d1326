package enroll_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/identity"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

// do sends a request presenting cert as client certificate, whoever issued
// it (a Go client configured with Certificates would not send a certificate
// the server's CertificateRequest does not ask for), and returns the status
// and the error code of the answer.
func do(t *testing.T, g *testenv.Gateway, cert *tls.Certificate, method, path string, body []byte) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, g.URL()+path, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs:              g.Roots(),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil },
	}}}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e api.Error
	if resp.StatusCode != http.StatusOK {
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("error body is not JSON: %q", b)
		}
	}
	return resp.StatusCode, e.Code
}

// The API requests client certificates at the handshake and verifies them
// where they are used (Server.Authenticate: admin API, renewal): a
// certificate that does not verify is refused there exactly as before, and
// the enrollment endpoints, which do not use client certificates, ignore it.
func TestClientCertificatesAreVerifiedWhereUsed(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	key, err := ca.ReadKeyFile(filepath.Join(g.DataDir, ca.IssuingKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	ours := &testpki.CA{Cert: g.CA.Issuing(), Key: key.(*ecdsa.PrivateKey)}
	foreign := testpki.NewCA(t, "another CA")
	opURI := identity.Identity{Role: identity.RoleOperator, Name: "admin"}.URI(g.CA.TrustDomain).String()
	devURI := identity.Identity{Role: identity.RoleDevice, Name: "dev-1"}.URI(g.CA.TrustDomain).String()
	now := time.Now()

	for _, tc := range []struct {
		name string
		cert tls.Certificate
		code string
	}{
		{"an operator certificate from another CA is refused", testpki.Issue(t, foreign, testpki.Leaf{URI: opURI, CN: "admin"}), "client_cert_invalid"},
		{"a self-signed operator certificate is refused", testpki.Issue(t, nil, testpki.Leaf{URI: opURI, CN: "admin"}), "client_cert_invalid"},
		{"an expired operator certificate of this CA is refused", testpki.Issue(t, ours, testpki.Leaf{URI: opURI, CN: "admin", NotBefore: now.Add(-2 * time.Hour), NotAfter: now.Add(-time.Hour)}), "client_cert_invalid"},
		{"a not yet valid operator certificate of this CA is refused", testpki.Issue(t, ours, testpki.Leaf{URI: opURI, CN: "admin", NotBefore: now.Add(time.Hour), NotAfter: now.Add(2 * time.Hour)}), "client_cert_invalid"},
		{"an operator certificate of this CA for server authentication is refused", testpki.Issue(t, ours, testpki.Leaf{URI: opURI, CN: "admin", EKU: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}), "client_cert_invalid"},
		{"a valid operator certificate the registry never issued is refused", testpki.Issue(t, ours, testpki.Leaf{URI: opURI, CN: "admin"}), "client_cert_unknown"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if status, code := do(t, g, &tc.cert, http.MethodGet, api.PathAdminDevices, nil); status != http.StatusUnauthorized || code != tc.code {
				t.Fatalf("admin API: %d %s, want 401 %s", status, code, tc.code)
			}
		})
	}

	t.Run("a renewal with a device certificate from another CA is refused", func(t *testing.T) {
		g.EnrollDevice(t, "dev-1", "lab")
		cert := testpki.Issue(t, foreign, testpki.Leaf{URI: devURI, CN: "dev-1"})
		body, _ := json.Marshal(api.RenewRequest{CSR: csrFor(t, cert.PrivateKey)})
		if status, code := do(t, g, &cert, http.MethodPost, api.PathRenew, body); status != http.StatusUnauthorized || code != "client_cert_invalid" {
			t.Fatalf("renewal: %d %s, want 401 client_cert_invalid", status, code)
		}
	})

	t.Run("enrollment ignores a client certificate it does not use", func(t *testing.T) {
		cert := testpki.Issue(t, foreign, testpki.Leaf{URI: devURI, CN: "dev-2"})
		tok := g.Token(t, "dev-2", "lab", time.Hour)
		body := enrollBody(t, tok, "dev-2", csrFor(t, testpki.NewKey(t)))
		if status, code := do(t, g, &cert, http.MethodPost, api.PathEnrollToken, body); status != http.StatusOK {
			t.Fatalf("token enrollment presenting a foreign certificate: %d %s", status, code)
		}
	})

	t.Run("the operator's own certificate is accepted", func(t *testing.T) {
		if _, err := g.Admin.CreateToken(t.Context(), api.TokenCreateRequest{DeviceID: "ok-dev", Group: "lab"}); err != nil {
			t.Fatal(err)
		}
	})
}
