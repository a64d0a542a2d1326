package diagnose_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
	"github.com/fleetgate/fleetgate/operator/diagnose"
)

// signer is a CA that can sign test certificates.
type signer struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func loadSigner(t *testing.T, dataDir, certFile, keyFile string) signer {
	t.Helper()
	c, err := ca.ReadCertFile(filepath.Join(dataDir, certFile))
	if err != nil {
		t.Fatal(err)
	}
	k, err := ca.ReadKeyFile(filepath.Join(dataDir, keyFile))
	if err != nil {
		t.Fatal(err)
	}
	return signer{c, k}
}

// leafOpts shape a certificate; the zero value is a valid device
// certificate for device "id" of trust domain test.fleetgate.
type leafOpts struct {
	id        string
	noURI     bool
	serial    *big.Int
	notBefore time.Time
	notAfter  time.Time
	eku       []x509.ExtKeyUsage
	isCA      bool
	key       crypto.Signer
}

func issue(t *testing.T, by signer, o leafOpts) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := o.key
	if key == nil {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		key = k
	}
	if o.serial == nil {
		o.serial, _ = rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	}
	if o.notBefore.IsZero() {
		o.notBefore = time.Now().Add(-time.Hour)
	}
	if o.notAfter.IsZero() {
		o.notAfter = time.Now().Add(24 * time.Hour)
	}
	if o.eku == nil {
		o.eku = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	tmpl := &x509.Certificate{SerialNumber: o.serial, Subject: pkix.Name{CommonName: o.id}, NotBefore: o.notBefore, NotAfter: o.notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: o.eku, BasicConstraintsValid: true, IsCA: o.isCA}
	if o.isCA {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
		tmpl.ExtKeyUsage = nil
	}
	if !o.noURI && !o.isCA {
		tmpl.URIs = []*url.URL{{Scheme: "spiffe", Host: "test.fleetgate", Path: "/device/" + o.id}}
	}
	parent, pkey := by.cert, by.key
	if by.cert == nil { // self-signed
		parent, pkey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), pkey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func pemOf(certs ...*x509.Certificate) string {
	var b strings.Builder
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.String()
}

// failures reads fleetgate_broker_auth_failures_total{reason}.
func failures(t *testing.T, g *testenv.Gateway, reason string) int {
	t.Helper()
	m := regexp.MustCompile(`(?m)^fleetgate_broker_auth_failures_total\{reason="` + regexp.QuoteMeta(reason) + `"\} (\d+)`).FindStringSubmatch(g.Metrics(t))
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestDiagnoseFailureModes: for each failure mode operators hit, diagnose
// (the server's admin endpoint, plus the key check the CLI makes locally)
// names the problem and the broker's reason, and the real broker, given
// the same certificate in a live attempt, refuses it and counts that same
// reason in fleetgate_broker_auth_failures_total.
func TestDiagnoseFailureModes(t *testing.T) {
	ctx := context.Background()
	g := testenv.Start(t, testenv.Options{})
	issuing := loadSigner(t, g.DataDir, ca.IssuingCertFile, ca.IssuingKeyFile)
	root := loadSigner(t, g.DataDir, ca.RootCertFile, ca.RootKeyFile)
	other := testenv.Init(t) // another installation, same trust domain and CA names
	otherIssuing := loadSigner(t, other, ca.IssuingCertFile, ca.IssuingKeyFile)
	foreignCA := testpki.NewCA(t, "foreign root")
	foreign := signer{foreignCA.Cert, foreignCA.Key}

	enrolled := func(id string) (*x509.Certificate, crypto.Signer) {
		d := g.EnrollDevice(t, id, "lab")
		cfg, err := d.TLSConfig("localhost")
		if err != nil {
			t.Fatal(err)
		}
		c, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		if err != nil {
			t.Fatal(err)
		}
		return d.Leaf(), c.PrivateKey.(crypto.Signer)
	}
	okLeaf, okKey := enrolled("d-ok")
	crevLeaf, crevKey := enrolled("d-crev")
	if err := g.Admin.RevokeCertificate(ctx, crevLeaf.SerialNumber.Text(16), "test"); err != nil {
		t.Fatal(err)
	}
	revLeaf, revKey := enrolled("d-rev")
	if _, err := g.Admin.DeviceAction(ctx, "d-rev", "revoke", "stolen"); err != nil {
		t.Fatal(err)
	}
	susLeaf, susKey := enrolled("d-sus")
	if _, err := g.Admin.DeviceAction(ctx, "d-sus", "suspend", "maintenance"); err != nil {
		t.Fatal(err)
	}
	sub, subKey := issue(t, issuing, leafOpts{id: "sub CA", isCA: true})
	subLeaf, subLeafKey := issue(t, signer{sub, subKey}, leafOpts{id: "d-ok"})
	foreignLeaf, foreignKey := issue(t, foreign, leafOpts{id: "d-ok"})
	otherLeaf, otherKey := issue(t, otherIssuing, leafOpts{id: "d-ok"})
	rootLeaf, rootKey := issue(t, root, leafOpts{id: "d-ok"})
	expLeaf, expKey := issue(t, issuing, leafOpts{id: "d-ok", serial: okLeaf.SerialNumber, notBefore: time.Now().Add(-48 * time.Hour), notAfter: time.Now().Add(-3 * time.Hour)})
	nyvLeaf, nyvKey := issue(t, issuing, leafOpts{id: "d-ok", serial: okLeaf.SerialNumber, notBefore: time.Now().Add(2 * time.Hour)})
	ekuLeaf, ekuKey := issue(t, issuing, leafOpts{id: "d-ok", serial: okLeaf.SerialNumber, eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	noURILeaf, noURIKey := issue(t, issuing, leafOpts{id: "d-ok", noURI: true})
	unkLeaf, unkKey := issue(t, issuing, leafOpts{id: "d-ok"})
	misLeaf, misKey := issue(t, issuing, leafOpts{id: "d-sus", serial: okLeaf.SerialNumber})
	p224, err := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	algLeaf, algKey := issue(t, issuing, leafOpts{id: "d-ok", serial: okLeaf.SerialNumber, key: p224})
	wrongKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	cases := []struct {
		name     string
		chain    []*x509.Certificate
		key      crypto.Signer
		device   string // diagnose: the device it should be
		clientID string // the live attempt's client ID
		problem  string
		reason   string // the broker's
	}{
		{"chain incomplete", []*x509.Certificate{subLeaf}, subLeafKey, "", "d-ok", diagnose.ProblemChainIncomplete, "unknown_ca"},
		{"issuer not trusted", []*x509.Certificate{foreignLeaf, foreignCA.Cert}, foreignKey, "", "d-ok", diagnose.ProblemIssuerUntrusted, "unknown_ca"},
		{"issuer of another installation", []*x509.Certificate{otherLeaf}, otherKey, "", "d-ok", diagnose.ProblemIssuerOtherKey, "unknown_ca"},
		{"signed by the root CA", []*x509.Certificate{rootLeaf}, rootKey, "", "d-ok", diagnose.ProblemIssuerIsRoot, "unknown_ca"},
		{"expired", []*x509.Certificate{expLeaf}, expKey, "", "d-ok", diagnose.ProblemExpired, "expired"},
		{"not yet valid", []*x509.Certificate{nyvLeaf}, nyvKey, "", "d-ok", diagnose.ProblemNotYetValid, "expired"},
		{"wrong EKU", []*x509.Certificate{ekuLeaf}, ekuKey, "", "d-ok", diagnose.ProblemWrongEKU, "wrong_key_usage"},
		{"key algorithm", []*x509.Certificate{algLeaf}, algKey, "", "d-ok", diagnose.ProblemKeyAlgorithm, "handshake_failed"},
		{"key of another certificate", []*x509.Certificate{okLeaf}, wrongKey, "", "d-ok", diagnose.ProblemKeyMismatch, "handshake_failed"},
		{"identity URI missing", []*x509.Certificate{noURILeaf}, noURIKey, "", "d-ok", diagnose.ProblemNoIdentity, "no_identity"},
		{"identity of another device", []*x509.Certificate{okLeaf}, okKey, "d-sus", "d-sus", diagnose.ProblemOtherDevice, "client_id_mismatch"},
		{"serial unknown to the registry", []*x509.Certificate{unkLeaf}, unkKey, "", "d-ok", diagnose.ProblemUnknownSerial, "unknown_serial"},
		{"serial issued to another identity", []*x509.Certificate{misLeaf}, misKey, "", "d-sus", diagnose.ProblemIdentityMismatch, "identity_mismatch"},
		{"certificate revoked", []*x509.Certificate{crevLeaf}, crevKey, "", "d-crev", diagnose.ProblemCertRevoked, "revoked"},
		{"device revoked", []*x509.Certificate{revLeaf}, revKey, "", "d-rev", diagnose.ProblemDeviceRevoked, "revoked"},
		{"device suspended", []*x509.Certificate{susLeaf}, susKey, "", "d-sus", diagnose.ProblemDeviceSuspended, "suspended"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := g.Admin.Diagnose(ctx, api.DiagnoseRequest{ChainPEM: pemOf(tc.chain...), DeviceID: tc.device})
			if err != nil {
				t.Fatal(err)
			}
			if kc := diagnose.KeyChecks(tc.chain[0], tc.key); !kc.OK && rep.Accepted {
				rep.Accepted, rep.Reason, rep.Problem, rep.Summary = false, "handshake_failed", diagnose.ProblemKeyMismatch, kc.Detail
			}
			if rep.Accepted || rep.Problem != tc.problem || rep.Reason != tc.reason || rep.Summary == "" {
				t.Fatalf("diagnose: accepted %v, problem %q, reason %q (want %q, %q)\n%s\n%+v", rep.Accepted, rep.Problem, rep.Reason, tc.problem, tc.reason, rep.Summary, rep.Checks)
			}
			t.Logf("%s: %s", tc.problem, rep.Summary)

			// The real broker, with the same certificate and key.
			before := failures(t, g, tc.reason)
			cert := tls.Certificate{PrivateKey: tc.key, Leaf: tc.chain[0]}
			for _, c := range tc.chain {
				cert.Certificate = append(cert.Certificate, c.Raw)
			}
			live := diagnose.Connect(ctx, g.Addrs.MQTT, "localhost", g.Roots(), cert, tc.clientID)
			if live.Accepted {
				t.Fatalf("the broker accepted what diagnose refuses: %+v", live)
			}
			testenv.Eventually(t, 10*time.Second, func() error {
				if n := failures(t, g, tc.reason); n != before+1 {
					return fmt.Errorf("broker counted %d refusals %q (before %d); live attempt: %+v\n%s", n, tc.reason, before, live, grepLines(g.Metrics(t), "auth_failures"))
				}
				return nil
			})
		})
	}

	t.Run("accepted", func(t *testing.T) {
		rep, err := g.Admin.Diagnose(ctx, api.DiagnoseRequest{ChainPEM: pemOf(okLeaf), DeviceID: "d-ok"})
		if err != nil || !rep.Accepted || rep.Reason != "" {
			t.Fatalf("%+v %v", rep, err)
		}
		cert := tls.Certificate{PrivateKey: okKey, Leaf: okLeaf, Certificate: [][]byte{okLeaf.Raw}}
		if live := diagnose.Connect(ctx, g.Addrs.MQTT, "localhost", g.Roots(), cert, "d-ok"); !live.Accepted {
			t.Fatalf("live: %+v", live)
		}
	})
	t.Run("by device ID", func(t *testing.T) {
		rep, err := g.Admin.Diagnose(ctx, api.DiagnoseRequest{DeviceID: "d-sus"})
		if err != nil || rep.Problem != diagnose.ProblemDeviceSuspended || rep.Serial != susLeaf.SerialNumber.Text(16) {
			t.Fatalf("%+v %v", rep, err)
		}
		if _, err := g.Admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: "d-new", Group: "lab", TTL: time.Hour}); err != nil {
			t.Fatal(err)
		}
		if rep, err := g.Admin.Diagnose(ctx, api.DiagnoseRequest{DeviceID: "d-none"}); err == nil {
			t.Fatalf("unknown device: %+v", rep)
		}
	})
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
