package acl

import (
	"testing"

	"github.com/fleetgate/fleetgate/identity"
)

// TestNamesScopeARuleToOneService: a rule with names: applies to those
// identities only; a bad name is refused with its line.
func TestNamesScopeARuleToOneService(t *testing.T) {
	p, err := ParseFile("p.yaml", []byte(`rules:
  - name: billing-lab
    roles: [service]
    names: [billing]
    allow: [subscribe]
    topics: ["groups/lab/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	billing := Subject{Role: identity.RoleService, ID: "billing"}
	other := Subject{Role: identity.RoleService, ID: "analytics"}
	if !p.CheckSubscribe(billing, "groups/lab/#").Allowed {
		t.Fatal("billing refused its scope")
	}
	if p.CheckSubscribe(other, "groups/lab/#").Allowed || p.CheckSubscribe(billing, "groups/other/#").Allowed {
		t.Fatal("the names: rule applied outside its scope")
	}
	if _, err := ParseFile("p.yaml", []byte("rules:\n  - name: x\n    names: [Bad_Name]\n    allow: [subscribe]\n    topics: [a]\n")); err == nil {
		t.Fatal("a bad name was accepted")
	}
}
