package deptest

import (
	"slices"
	"testing"
)

// rules are fleetgate's layering (docs/architecture.md, "The parts, and
// where they live"): who may not depend on whom.
var rules = []struct {
	patterns  []string
	forbidden []string // module-relative package prefixes
	why       string
}{
	{[]string{"./broker/..."}, []string{"enroll"},
		"the broker reads the directory and takes its trust anchors as values; it never reaches into enrollment"},
	{[]string{"./devicesdk/..."}, []string{"enroll", "broker", "operator", "server", "directory", "internal/testenv", "internal/fleetproc"},
		"the device SDK is linked into firmware: it speaks the wire types (api) and nothing of the server"},
	{[]string{"./fleet/...", "./directory/...", "./identity/...", "./api/..."}, []string{"enroll", "broker", "operator", "server"},
		"the ground floor is imported by every part and imports none of them"},
}

func TestLayering(t *testing.T) {
	if testing.Short() {
		t.Skip("runs go list")
	}
	for _, r := range rules {
		g, roots, err := List("../..", r.patterns...)
		if err != nil {
			t.Fatal(err)
		}
		if len(roots) == 0 {
			t.Errorf("%v: no packages", r.patterns)
		}
		forbidden := func(p string) bool {
			return slices.ContainsFunc(r.forbidden, func(f string) bool { return Under(p, f) })
		}
		for _, v := range Violations(g, roots, forbidden) {
			t.Errorf("forbidden dependency (%s): %s", r.why, v)
		}
	}
}

// The checker finds an indirect dependency and names the chain.
func TestViolationsNamesTheChain(t *testing.T) {
	g := Graph{
		Module + "/broker":         {Module + "/broker/auth", "fmt"},
		Module + "/broker/auth":    {Module + "/directory", Module + "/enroll/ca"},
		Module + "/directory":      {Module + "/fleet"},
		Module + "/enroll/ca":      {"crypto/x509"},
		Module + "/broker/acl":     {"strings"},
		Module + "/fleet":          nil,
		Module + "/enrollment-ish": nil,
	}
	got := Violations(g, []string{Module + "/broker", Module + "/broker/acl"}, func(p string) bool { return Under(p, "enroll") })
	want := []string{Module + "/broker -> " + Module + "/broker/auth -> " + Module + "/enroll/ca"}
	if !slices.Equal(got, want) {
		t.Fatalf("violations %q, want %q", got, want)
	}
	if Under(Module+"/enrollment-ish", "enroll") {
		t.Error("a prefix of a name is not the package")
	}
}
