package acl

import (
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/identity"
)

const attestationPolicy = `rules:
  - name: firmware-report
    roles: [device]
    attestation: [tpm]
    allow: [publish]
    topics: ["devices/{id}/firmware/#"]
  - name: no-token-config
    roles: [device]
    attestation: [token]
    deny: [subscribe]
    topics: ["devices/{id}/config/#"]
  - name: config
    roles: [device]
    allow: [subscribe]
    topics: ["devices/{id}/config/#"]
`

// A rule with attestation: applies only to devices enrolled with one of its
// methods; services and devices of unknown method never match it; explain
// names the condition and the misses say why a rule missed.
func TestAttestationScopesRules(t *testing.T) {
	p, err := ParseFile("t", []byte(attestationPolicy))
	if err != nil {
		t.Fatal(err)
	}
	tpm := Subject{Role: identity.RoleDevice, ID: "d1", Attestation: MethodTPM}
	tok := Subject{Role: identity.RoleDevice, ID: "d1", Attestation: MethodToken}
	unknown := Subject{Role: identity.RoleDevice, ID: "d1"}
	for _, tc := range []struct {
		name string
		s    Subject
		pub  bool
		t    string
		want bool
	}{
		{"tpm device publishes firmware report", tpm, true, "devices/d1/firmware/v", true},
		{"token device may not", tok, true, "devices/d1/firmware/v", false},
		{"device of unknown method may not", unknown, true, "devices/d1/firmware/v", false},
		{"tpm device reads config", tpm, false, "devices/d1/config/#", true},
		{"token device is denied config", tok, false, "devices/d1/config/#", false},
		{"unknown method: the deny rule does not apply", unknown, false, "devices/d1/config/#", true},
	} {
		var d Decision
		if tc.pub {
			d = p.CheckPublish(tc.s, tc.t, false)
		} else {
			d = p.CheckSubscribe(tc.s, tc.t)
		}
		if d.Allowed != tc.want {
			t.Errorf("%s: got %v (%s)", tc.name, d.Allowed, p.Explain(d))
		}
	}
	if got := p.Explain(p.CheckPublish(tpm, "devices/d1/firmware/v", false)); !strings.Contains(got, "attestation tpm") {
		t.Errorf("explain does not show the condition: %s", got)
	}
	m := p.Misses(tok, "devices/d1/firmware/v", true, false)
	if len(m) != 1 || m[0].Rule.Name != "firmware-report" || !strings.Contains(m[0].Reason, "requires attestation tpm, the subject's is token") {
		t.Fatalf("misses: %+v", m)
	}
	if d := m[0].Rule.Describe(); d != "allow publish devices/{id}/firmware/# (roles device, attestation tpm)" {
		t.Errorf("describe: %q", d)
	}
	if _, err := ParseFile("t", []byte("rules:\n  - attestation: [tmp]\n    allow: [publish]\n    topics: [x]\n")); err == nil || !strings.Contains(err.Error(), `unknown attestation method "tmp"`) {
		t.Errorf("a misspelt method: %v", err)
	}
}
