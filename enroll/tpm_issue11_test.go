package enroll_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/internal/testpki"
)

// issue11Server is directServer with a deny-list and a metrics registry.
type issue11Server struct {
	url     string
	reg     *registry.Registry
	metrics *prometheus.Registry
}

func newIssue11Server(tb testing.TB, roots *x509.CertPool, policy string, deny *attest.DenyList) *issue11Server {
	tb.Helper()
	dataDir := testenv.Init(tb)
	auth, err := ca.Load(dataDir, ca.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	reg, err := registry.Open(filepath.Join(tb.TempDir(), "registry"), registry.Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { reg.Close() })
	pr := prometheus.NewRegistry()
	s, err := enroll.New(enroll.Config{CA: auth, Registry: reg, TPMRoots: roots, TPMPolicy: policy, TPMDenyList: deny,
		Metrics: pr, ChallengeTTL: time.Minute})
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(s.Handler())
	tb.Cleanup(srv.Close)
	return &issue11Server{url: srv.URL, reg: reg, metrics: pr}
}

// refused asserts the refusal was audited and counted under its code.
func (s *issue11Server) refused(t *testing.T, code string) {
	t.Helper()
	recs, err := s.reg.AuditLog("", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(recs, func(r registry.AuditRecord) bool {
		return r.Outcome == registry.OutcomeDenied && strings.HasPrefix(r.Reason, code+":")
	}) {
		t.Errorf("no audit record with reason %s", code)
	}
	mfs, err := s.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() != "fleetgate_enrollments_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == code && m.GetCounter().GetValue() >= 1 {
					found = true
				}
			}
		}
	}
	if !found {
		t.Errorf("fleetgate_enrollments_total has no outcome=%q", code)
	}
}

// craftedEK is an EK certificate issued by m (the trusted manufacturer)
// outside any TPM, for a software P-256 key, with mutate applied.
func craftedEK(t *testing.T, m *swtpm.Manufacturer, pub any, mutate func(*x509.Certificate)) []byte {
	t.Helper()
	tmpl, err := swtpm.EKCertTemplate(pub, swtpm.SWTPMIdentity)
	if err != nil {
		t.Fatal(err)
	}
	if mutate != nil {
		mutate(tmpl)
	}
	der, err := m.IssueEKCert(tmpl, pub)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestTPMEKIsAnEK: under both policies, only an EK certificate by the TCG
// profile is taken as one. The attacker holds the private key of a
// certificate a trusted manufacturer issued (for another purpose) and would
// answer the credential challenge in software.
func TestTPMEKIsAnEK(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	srv := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, nil)
	d := newTPMDevice(t, m, srv.url, nil, "")
	sw, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signingLeaf := craftedEK(t, m, &sw.PublicKey, func(c *x509.Certificate) {
		c.KeyUsage = x509.KeyUsageDigitalSignature
		c.UnknownExtKeyUsage = nil
		c.ExtraExtensions = nil
	})
	dnsSAN := craftedEK(t, m, &sw.PublicKey, func(c *x509.Certificate) {
		san := c.ExtraExtensions[0].Value
		var names []asn1.RawValue
		if _, err := asn1.Unmarshal(san, &names); err != nil {
			t.Fatal(err)
		}
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte("tpm.example.com")})
		v, err := asn1.Marshal(names)
		if err != nil {
			t.Fatal(err)
		}
		c.ExtraExtensions[0].Value = v
	})
	clientAuthEKU := craftedEK(t, m, &sw.PublicKey, func(c *x509.Certificate) { c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth} })

	for _, tc := range []struct {
		name string
		ek   []byte
		want string
	}{
		{"a signing-only leaf without EKU or SAN from the manufacturer is refused as EK certificate", signingLeaf, "ek_key_usage"},
		{"a critical SAN carrying a DNS name next to the TCG directoryName is refused", dnsSAN, "ek_san_invalid"},
		{"an EKU with clientAuth next to tcg-kp-EKCertificate is refused", clientAuthEKU, "ek_eku_invalid"},
		{"an EK certificate that does not parse has its own code", []byte("not a certificate"), "ek_cert_malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, e := postJSON(t, plainTarget(srv.url), api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: tc.ek, AKPublic: d.keys.AKPublic()}, nil)
			if e.Code != tc.want {
				t.Fatalf("got %d %+v, want %s", code, e, tc.want)
			}
			srv.refused(t, tc.want)
		})
	}

	// The allowlist policy without roots parses the certificate only; it
	// must still be an EK certificate to be registered.
	g := testenv.Start(t, testenv.Options{})
	ctx := context.Background()
	for _, tc := range []struct {
		ek   []byte
		want string
	}{
		{signingLeaf, "ek_key_usage"}, {dnsSAN, "ek_san_invalid"}, {[]byte("garbage"), "ek_cert_malformed"},
		{craftedEK(t, m, &rsa.PublicKey{N: testpki.ROCAModulus(t), E: 65537}, nil), "ek_roca"},
	} {
		if _, err := g.Admin.RegisterEK(ctx, api.EKRegisterRequest{EKCert: tc.ek, DeviceID: "not-an-ek"}); !isCode(err, tc.want) {
			t.Errorf("registering without roots: %v, want %s", err, tc.want)
		}
	}
	// A genuine swtpm EK certificate still registers and enrolls.
	if _, err := g.Admin.RegisterEK(ctx, api.EKRegisterRequest{EKCert: d.keys.EK().CertDER, DeviceID: "genuine"}); err != nil {
		t.Fatalf("registering a swtpm EK without roots: %v", err)
	}
	req := round2(t, d, round1(t, plainTarget(srv.url), d, ""))
	if code, e := postJSON(t, plainTarget(srv.url), api.PathTPMComplete, req, nil); code != http.StatusOK {
		t.Fatalf("genuine enrollment: %d %+v", code, e)
	}
}

// TestTPMDenyList: the operator's deny-list refuses TPMs by manufacturer,
// model and firmware version, ROCA-vulnerable EKs are refused in any case,
// and a rule that does not match leaves enrollment alone.
func TestTPMDenyList(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	deny, err := attest.ParseDenyList([]byte(`
deny:
  - name: swtpm before 2020
    manufacturer: id:00001014
    model: swtpm
    versions_below: id:20200101
`))
	if err != nil {
		t.Fatal(err)
	}
	denying := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, deny)
	d := newTPMDevice(t, m, denying.url, nil, "")
	code, e := postJSON(t, plainTarget(denying.url), api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()}, nil)
	if e.Code != "ek_denied" || code != http.StatusForbidden {
		t.Fatalf("denied TPM: %d %+v, want 403 ek_denied", code, e)
	}
	denying.refused(t, "ek_denied")

	// ROCA: an RSA EK whose modulus has the structure of the vulnerable
	// library, certified by the trusted manufacturer.
	roca := craftedEK(t, m, &rsa.PublicKey{N: testpki.ROCAModulus(t), E: 65537}, nil)
	code, e = postJSON(t, plainTarget(denying.url), api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: roca, AKPublic: d.keys.AKPublic()}, nil)
	if e.Code != "ek_roca" {
		t.Fatalf("ROCA EK: %d %+v, want ek_roca", code, e)
	}
	denying.refused(t, "ek_roca")

	// Without any deny-list, ROCA is still refused; swtpm enrolls.
	open := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, nil)
	if _, e := postJSON(t, plainTarget(open.url), api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: roca, AKPublic: d.keys.AKPublic()}, nil); e.Code != "ek_roca" {
		t.Fatalf("ROCA EK without deny-list: %+v, want ek_roca", e)
	}
	other, err := attest.ParseDenyList([]byte("deny:\n  - manufacturer: id:00001014\n    versions_below: id:20000101\n"))
	if err != nil {
		t.Fatal(err)
	}
	allowing := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, other)
	req := round2(t, d, round1(t, plainTarget(allowing.url), d, ""))
	if code, e := postJSON(t, plainTarget(allowing.url), api.PathTPMComplete, req, nil); code != http.StatusOK {
		t.Fatalf("enrollment with a non-matching rule: %d %+v", code, e)
	}
}

// TestTPMMalformedCompletionConsumesChallenge: a round-2 request refused
// for its body still consumes the challenge it names.
func TestTPMMalformedCompletionConsumesChallenge(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	srv := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, nil)
	d := newTPMDevice(t, m, srv.url, nil, "")
	to := plainTarget(srv.url)
	for _, tc := range []struct {
		name string
		body func(good []byte, id string) []byte
	}{
		{"bad base64 in a field", func(_ []byte, id string) []byte {
			return []byte(`{"challenge_id":"` + id + `","secret":"%%%"}`)
		}},
		{"an unknown field", func(good []byte, _ string) []byte {
			return append(bytes.TrimSuffix(bytes.TrimSpace(good), []byte("}")), []byte(`,"extra":1}`)...)
		}},
		{"trailing data", func(good []byte, _ string) []byte { return append(bytes.Clone(good), []byte(` {}`)...) }},
		{"a truncated body", func(good []byte, _ string) []byte { return good[:len(good)/2] }},
		// L2: encoding/json matches keys in any case and keeps the last
		// duplicate; the refused body's challenge is found the same way.
		{"the key in upper case", func(_ []byte, id string) []byte {
			return []byte(`{"CHALLENGE_ID":"` + id + `","secret":"%%%"}`)
		}},
		{"the key in mixed case, escaped", func(_ []byte, id string) []byte {
			return []byte(`{"Challenge\u005FId":"` + id + `","extra":1}`)
		}},
		{"decoys before the real ID", func(_ []byte, id string) []byte {
			decoys := strings.Repeat(`"challenge_id":"decoy",`, 40)
			return []byte(`{` + decoys + `"challenge_id":"` + id + `","secret":"%%%"}`)
		}},
		{"decoys in another case before the real ID", func(_ []byte, id string) []byte {
			return []byte(`{"challenge_id":"d1","Challenge_ID":"d2","CHALLENGE_id":"d3","challenge_ID":"d4","cHALLENGE_ID":"` + id + `","secret":1}`)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ch := round1(t, to, d, "")
			req := round2(t, d, ch)
			good, err := json.Marshal(req)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.Post(srv.url+api.PathTPMComplete, "application/json", bytes.NewReader(tc.body(good, ch.ChallengeID)))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "malformed_json") {
				t.Fatalf("malformed completion: %d %s", resp.StatusCode, b)
			}
			if code, e := postJSON(t, to, api.PathTPMComplete, req, nil); e.Code != "challenge_unknown" {
				t.Fatalf("honest completion after a malformed one: %d %+v, want challenge_unknown", code, e)
			}
		})
	}
}

// TestTPMAKPolicyOverHTTP: an AK with an authorization policy is refused at
// round 1 with its own code.
func TestTPMAKPolicyOverHTTP(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	srv := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, nil)
	d := newTPMDevice(t, m, srv.url, nil, "")
	tmpl := tpmkey.AKTemplate()
	tmpl.AuthPolicy.Buffer = bytes.Repeat([]byte{7}, 32)
	pub := newAttacker(t, d).createKey(tmpl)
	if code, e := postJSON(t, plainTarget(srv.url), api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: d.keys.EK().CertDER, AKPublic: pub}, nil); e.Code != "ak_policy" {
		t.Fatalf("AK with authPolicy: %d %+v, want ak_policy", code, e)
	}
	srv.refused(t, "ak_policy")
}
