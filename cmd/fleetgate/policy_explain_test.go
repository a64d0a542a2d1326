package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// `policy explain` with an attestation condition: --attestation gives the
// method, --from-registry reads it (and the group) from the server; a rule
// that covers the topic but misses the device is named with why.
func TestPolicyExplainAttestation(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	g.EnrollDevice(t, "tok-1", "lab")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(pol, []byte(`rules:
  - name: firmware-tpm-only
    roles: [device]
    attestation: [tpm]
    allow: [publish]
    topics: ["devices/{id}/firmware/#"]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"policy", "explain", "--policy", pol, "--identity", "spiffe://test.fleetgate/device/tok-1", "--publish", "devices/tok-1/firmware/v2"}

	out, _, err := runCLI(t, g, append(base, "--attestation", "tpm")...)
	if err != nil || !strings.Contains(out, `allow by rule "firmware-tpm-only" (allow devices/{id}/firmware/#, roles device, attestation tpm)`) {
		t.Fatalf("tpm: %v\n%s", err, out)
	}
	for _, extra := range [][]string{{"--attestation", "token"}, {"--from-registry"}} {
		out, _, err = runCLI(t, g, append(base, extra...)...)
		if !errors.Is(err, errDenied) || !strings.Contains(out, "deny by default") ||
			!strings.Contains(out, `rule "firmware-tpm-only" (allow publish devices/{id}/firmware/# (roles device, attestation tpm)) missed: the rule requires attestation tpm, the subject's is token`) {
			t.Fatalf("%v: %v\n%s", extra, err, out)
		}
	}
	if !strings.Contains(out, "subject: group lab, attestation token") {
		t.Fatalf("--from-registry did not read the group and method:\n%s", out)
	}
}
