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
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
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

// TestTPMDenyListJudgesSignedFirmware: M5. The deny-list judges the
// firmware the TPM runs, as it signs it into the TPM2_Certify attestation
// of round 2 (TPMS_ATTEST.firmwareVersion), not only the version its EK
// certificate was issued with. A real swtpm (firmware id:20191023) whose EK
// is certified by its trusted manufacturer with a newer version passes
// round 1; at round 2 an AK in the endorsement hierarchy signs the true
// firmware version, and the TPM is refused with tpm_firmware_denied by a
// versions_below rule and by an exact versions rule (audited, counted, the
// challenge spent). With the SDK's AK (under the SRK) the TPM obfuscates
// firmwareVersion: it is not judged, and the TPM is not refused at random.
func TestTPMDenyListJudgesSignedFirmware(t *testing.T) {
	t.Parallel()
	m := swtpm.ManufacturerForTest(t)
	for _, tc := range []struct{ name, rule string }{
		{"versions_below", "versions_below: id:20200101"},
		{"versions", "versions: ['id:20191023']"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			deny, err := attest.ParseDenyList([]byte("deny:\n  - name: old swtpm\n    manufacturer: id:00001014\n    model: swtpm\n    " + tc.rule + "\n"))
			if err != nil {
				t.Fatal(err)
			}
			srv := newIssue11Server(t, m.RootPool(), enroll.TPMPolicyManufacturer, deny)
			d := newTPMDevice(t, m, srv.url, nil, "")
			to := plainTarget(srv.url)
			// The genuine certificate names the running version: refused
			// at round 1, as before.
			if _, e := postJSON(t, to, api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: d.keys.EK().CertDER, AKPublic: d.keys.AKPublic()}, nil); e.Code != "ek_denied" {
				t.Fatalf("genuine EK certificate: %+v, want ek_denied", e)
			}
			// The same TPM's EK, certified by the manufacturer with a
			// newer version (firmware at manufacture != firmware now).
			ekPub := d.keys.EK().Cert.PublicKey
			tmpl, err := swtpm.EKCertTemplate(ekPub, swtpm.TPMIdentity{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20250101"})
			if err != nil {
				t.Fatal(err)
			}
			newer, err := m.IssueEKCert(tmpl, ekPub)
			if err != nil {
				t.Fatal(err)
			}

			// An AK that is a primary of the endorsement hierarchy: the
			// TPM signs its true firmware version.
			a := newAttacker(t, d)
			ak, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tpmkey.AKTemplate())}.Execute(a.tr)
			if err != nil {
				t.Fatalf("CreatePrimary(AK, endorsement): %v", err)
			}
			var ch api.TPMChallengeResponse
			if code, e := postJSON(t, to, api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: newer, AKPublic: tpm2.Marshal(ak.OutPublic)}, &ch); code != http.StatusOK {
				t.Fatalf("round 1 with a certificate claiming id:20250101: %d %+v", code, e)
			}
			req := a.completeWithEndorsementAK(ak, ch)
			tpm2.FlushContext{FlushHandle: ak.ObjectHandle}.Execute(a.tr)
			fw := signedFirmware(t, req.CertifyInfo)
			if fw>>32 != 0x20191023 {
				t.Fatalf("swtpm signed firmwareVersion %#016x with an endorsement AK, want id:20191023 in the upper half", fw)
			}
			code, e := postJSON(t, to, api.PathTPMComplete, req, nil)
			if code != http.StatusForbidden || e.Code != "tpm_firmware_denied" {
				t.Fatalf("round 2 by firmware %#x: %d %+v, want 403 tpm_firmware_denied", fw, code, e)
			}
			srv.refused(t, "tpm_firmware_denied")
			if _, e := postJSON(t, to, api.PathTPMComplete, req, nil); e.Code != "challenge_unknown" {
				t.Fatalf("the refused challenge again: %+v, want challenge_unknown", e)
			}

			// The SDK's AK, under the SRK: the signed version is
			// obfuscated, not judged; the round-1 check decided.
			if code, e := postJSON(t, to, api.PathTPMChallenge, api.TPMChallengeRequest{EKCert: newer, AKPublic: d.keys.AKPublic()}, &ch); code != http.StatusOK {
				t.Fatalf("round 1 (SDK AK): %d %+v", code, e)
			}
			req = round2(t, d, ch)
			if fw := signedFirmware(t, req.CertifyInfo); fw>>32 == 0x20191023 {
				t.Fatalf("swtpm signed the true firmware version %#x with an AK outside the endorsement hierarchy", fw)
			}
			if code, e := postJSON(t, to, api.PathTPMComplete, req, nil); code != http.StatusOK {
				t.Fatalf("round 2 with the SDK's AK: %d %+v, want 200 (obfuscated version not judged)", code, e)
			}
		})
	}
}

// signedFirmware is TPMS_ATTEST.firmwareVersion of a TPM2B_ATTEST.
func signedFirmware(t *testing.T, info []byte) uint64 {
	t.Helper()
	a2b, err := tpm2.Unmarshal[tpm2.TPM2BAttest](info)
	if err != nil {
		t.Fatal(err)
	}
	att, err := a2b.Contents()
	if err != nil {
		t.Fatal(err)
	}
	return att.FirmwareVersion
}

// completeWithEndorsementAK answers ch with ak (a primary of the
// endorsement hierarchy): credential activation with the EK, and the
// device's TLS key certified by ak.
func (a *attacker) completeWithEndorsementAK(ak *tpm2.CreatePrimaryResponse, ch api.TPMChallengeResponse) api.TPMCompleteRequest {
	a.t.Helper()
	ekTmpl := tpm2.ECCEKTemplate
	if _, ok := a.d.keys.EK().Cert.PublicKey.(*rsa.PublicKey); ok {
		ekTmpl = tpm2.RSAEKTemplate
	}
	ek, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(ekTmpl)}.Execute(a.tr)
	if err != nil {
		a.t.Fatalf("CreatePrimary(EK): %v", err)
	}
	ekAuth := tpm2.Policy(ekTmpl.NameAlg, 16, func(tr transport.TPM, h tpm2.TPMISHPolicy, nonceTPM tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicySecret{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)}, PolicySession: h, NonceTPM: nonceTPM}.Execute(tr)
		return err
	})
	akH := tpm2.AuthHandle{Handle: ak.ObjectHandle, Name: ak.Name, Auth: tpm2.PasswordAuth(nil)}
	act, err := tpm2.ActivateCredential{ActivateHandle: akH, KeyHandle: tpm2.AuthHandle{Handle: ek.ObjectHandle, Name: ek.Name, Auth: ekAuth},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.CredentialBlob}, Secret: tpm2.TPM2BEncryptedSecret{Buffer: ch.EncryptedSecret}}.Execute(a.tr)
	tpm2.FlushContext{FlushHandle: ek.ObjectHandle}.Execute(a.tr) // three object slots: AK, SRK, TLS key
	if err != nil {
		a.t.Fatalf("ActivateCredential: %v", err)
	}
	tlsPub, err := os.ReadFile(filepath.Join(a.d.state, tpmkey.TLSPublicFile))
	if err != nil {
		a.t.Fatal(err)
	}
	tlsPriv, err := os.ReadFile(filepath.Join(a.d.state, tpmkey.TLSPrivateFile))
	if err != nil {
		a.t.Fatal(err)
	}
	var info, sig []byte
	a.withSRK(func(srk tpm2.AuthHandle) {
		tls := a.load(srk, tlsPub, tlsPriv)
		rsp, err := tpm2.Certify{ObjectHandle: tls, SignHandle: akH, QualifyingData: tpm2.TPM2BData{Buffer: ch.Nonce},
			InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull}}.Execute(a.tr)
		if err != nil {
			a.t.Fatalf("Certify: %v", err)
		}
		info, sig = tpm2.Marshal(rsp.CertifyInfo), tpm2.Marshal(rsp.Signature)
		tpm2.FlushContext{FlushHandle: tls.Handle}.Execute(a.tr)
	})
	return api.TPMCompleteRequest{ChallengeID: ch.ChallengeID, Secret: act.CertInfo.Buffer, TLSPublic: tlsPub,
		CertifyInfo: info, CertifySignature: sig, CSR: csrBy(a.t, a.d.keys.Signer())}
}
