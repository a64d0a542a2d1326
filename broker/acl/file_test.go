package acl

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/identity"
)

func TestDefaultPolicyCompiles(t *testing.T) {
	if _, err := ParseFile("default", []byte(DefaultFile)); err != nil {
		t.Fatal(err)
	}
}

func TestParseFileReportsEveryErrorWithItsLine(t *testing.T) {
	bad := `rules:
  - name: ok
    roles: [device]
    allow: [publish]
    topics: ["devices/{id}/x"]
  - name: two-effects
    allow: [publish]
    deny: [publish]
    topics: ["a"]
  - name: bad-role
    roles: [root]
    allow: [publish]
    topics: ["a"]
  - name: bad-topic
    allow: [subscribe]
    topics: ["a/#/b"]
  - name: bad-access
    allow: [write]
    topics: ["a"]
`
	_, err := ParseFile("p.yaml", []byte(bad))
	if err == nil {
		t.Fatal("bad policy accepted")
	}
	for _, want := range []string{"p.yaml:6: rule 2 (two-effects)", "p.yaml:10: rule 3 (bad-role)", "p.yaml:14: rule 4 (bad-topic)", "p.yaml:17: rule 5 (bad-access)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "rule 1") {
		t.Errorf("valid rule reported: %v", err)
	}
	for _, tc := range []struct{ name, src string }{
		{"an unknown key is refused", "rules:\n  - name: x\n    alow: [publish]\n    topics: [a]\n"},
		{"an empty file is refused", ""},
		{"a file without rules is refused", "rules: []\n"},
		{"YAML that does not parse is refused", "rules: [\n"},
		{"a bad tag name is refused", "rules:\n  - allow: [publish]\n    topics: ['a/{tag:Bad_Name}']\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseFile("p.yaml", []byte(tc.src)); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestTagPlaceholder(t *testing.T) {
	p, err := ParseFile("p", []byte(`rules:
  - name: site
    roles: [device]
    allow: [subscribe]
    topics: ["sites/{tag:site}/alerts/#"]
`))
	if err != nil {
		t.Fatal(err)
	}
	d := Subject{Role: identity.RoleDevice, ID: "d1", Group: "g", Tags: map[string]string{"site": "berlin"}}
	cases := []struct {
		name   string
		s      Subject
		filter string
		want   bool
	}{
		{"a device reads its site's alerts", d, "sites/berlin/alerts/#", true},
		{"a device may not read another site's", d, "sites/paris/alerts/#", false},
		{"a device without the tag gets nothing", Subject{Role: identity.RoleDevice, ID: "d1"}, "sites//alerts/#", false},
		{"a tag value with a wildcard never matches", Subject{Role: identity.RoleDevice, ID: "d1", Tags: map[string]string{"site": "+"}}, "sites/+/alerts/#", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := p.CheckSubscribe(tc.s, tc.filter).Allowed; got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestExplainNamesTheRule(t *testing.T) {
	p := Default()
	got := p.Explain(p.CheckPublish(dev, "devices/d1/state", true))
	if !strings.Contains(got, `allow by rule "device-state"`) {
		t.Fatalf("explain: %s", got)
	}
	got = p.Explain(p.CheckSubscribe(dev, "devices/#"))
	if !strings.Contains(got, "deny by default") {
		t.Fatalf("explain: %s", got)
	}
}

func FuzzParseFile(f *testing.F) {
	f.Add(DefaultFile)
	f.Add("rules:\n  - deny: [subscribe]\n    topics: ['#']\n")
	f.Fuzz(func(t *testing.T, src string) {
		p, err := ParseFile("fuzz", []byte(src))
		if err != nil {
			return
		}
		_ = p.CheckPublish(dev, "devices/d1/telemetry/x", false)
		_ = p.CheckSubscribe(dev, "devices/#")
	})
}

// LoadFileRules counts the rules written in the file, not the compiled
// ones (one per topic).
func TestLoadFileRulesCountsTheFilesRules(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(DefaultFile), 0o644); err != nil {
		t.Fatal(err)
	}
	p, n, err := LoadFileRules(path)
	if err != nil || n != 7 || len(p.Rules()) != 12 {
		t.Fatalf("LoadFileRules: %d file rules, %v; want 7 (12 compiled)", n, err)
	}
	if _, _, err := LoadFileRules(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Fatal("missing file loaded")
	}
}

// strictCases are files that a lax decoder loads as something other than
// what the operator wrote: each must be refused, naming the file and the
// line of the offending key or document.
var strictCases = []struct{ name, src, want string }{
	{"a typo in a rule key (group for groups)",
		"rules:\n  - name: lab-only\n    roles: [device]\n    group: [lab]\n    allow: [publish]\n    topics: [\"lab/#\"]\n",
		`p.yaml: yaml: unmarshal errors:
  line 4: field group not found`},
	{"an unknown top-level key",
		"rules:\n  - allow: [publish]\n    topics: [a]\ndefault_deny: false\n",
		"line 4: field default_deny not found"},
	{"a second document",
		"rules:\n  - allow: [publish]\n    topics: [a]\n---\nrules:\n  - deny: [publish]\n    topics: [a]\n",
		"p.yaml:4: a second YAML document"},
	{"a key written twice",
		"rules:\n  - allow: [publish]\n    topics: [a]\n    topics: [b]\n",
		`line 4: mapping key "topics" already defined`},
}

// TestParseFileIsStrict: H1. An unknown key (at any level) and a second
// document are refused with the line, not silently dropped.
func TestParseFileIsStrict(t *testing.T) {
	for _, tc := range strictCases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParseFile("p.yaml", []byte(tc.src))
			if err == nil {
				t.Fatalf("accepted, %d compiled rules: %+v", len(p.Rules()), p.Rules())
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error lacks %q:\n%v", tc.want, err)
			}
		})
	}
}

// TestReloadOfAStrictlyBrokenFileKeepsThePolicy: H1 through a reload: a
// reload reads the file again (LoadFileRules) and swaps the policy only
// on success. Each broken variant of the file is refused and the policy
// in force (the lab-only rule) still decides as before: a device outside
// the lab group may not publish to lab/#.
func TestReloadOfAStrictlyBrokenFileKeepsThePolicy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	good := "rules:\n  - name: lab-only\n    roles: [device]\n    groups: [lab]\n    allow: [publish]\n    topics: [\"lab/#\"]\n"
	if err := os.WriteFile(path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	inForce, _, err := LoadFileRules(path)
	if err != nil {
		t.Fatal(err)
	}
	reload := func() error {
		p, _, err := LoadFileRules(path)
		if err == nil {
			inForce = p
		}
		return err
	}
	lab := Subject{Role: identity.RoleDevice, ID: "d1", Group: "lab"}
	prod := Subject{Role: identity.RoleDevice, ID: "d2", Group: "prod"}
	for _, tc := range strictCases {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(tc.src), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := reload(); err == nil || !strings.Contains(err.Error(), path) {
				t.Fatalf("reload of the broken file: %v", err)
			}
			if !inForce.CheckPublish(lab, "lab/x", false).Allowed || inForce.CheckPublish(prod, "lab/x", false).Allowed {
				t.Fatal("the policy in force changed after a refused reload")
			}
		})
	}
}
