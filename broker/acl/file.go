package acl

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/fleetgate/fleetgate/identity"
)

// File is the YAML policy format operators edit:
//
//	rules:
//	  - name: device-telemetry
//	    roles: [device]          # device, service, operator; empty: all
//	    groups: [lab]            # device groups; empty: all
//	    attestation: [tpm]       # devices enrolled so (tpm, token); empty: all
//	    allow: [publish]         # or deny: [...]; publish, subscribe, retain
//	    topics: ["devices/{id}/telemetry/#"]
//
// Topics are MQTT filters; a whole level may be {id}, {group} or
// {tag:NAME} (a device tag from the registry).
type File struct {
	Rules []FileRule `yaml:"rules"`
}

// FileRule is one rule as written.
type FileRule struct {
	Name   string   `yaml:"name"`
	Roles  []string `yaml:"roles"`
	Groups []string `yaml:"groups"`
	// Attestation: the rule applies only to devices enrolled with one of
	// these methods (tpm, token).
	Attestation []string `yaml:"attestation"`
	Names       []string `yaml:"names"` // identity names (a service's), names.go
	Allow       []string `yaml:"allow"`
	Deny        []string `yaml:"deny"`
	Topics      []string `yaml:"topics"`
	line        int
}

// ParseFile parses and compiles a policy file. Every error is reported,
// each with its line.
func ParseFile(name string, data []byte) (*Policy, error) {
	p, _, err := parseFile(name, data)
	return p, err
}

// ParseFileRules is ParseFile that also returns the number of rules written
// in the file (a rule with several topics compiles into several rules).
func ParseFileRules(name string, data []byte) (*Policy, int, error) {
	return parseFile(name, data)
}

func parseFile(name string, data []byte) (*Policy, int, error) {
	// Strict: the file is decoded straight into File with KnownFields, so
	// an unknown key anywhere (a typo such as "group:" for "groups:", an
	// unknown top-level key) is refused with its line instead of being
	// dropped; yaml.v3 also refuses a key written twice. Decoding into a
	// yaml.Node first and then Node.Decode would check no keys at all.
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, 0, fmt.Errorf("%s: empty policy", name)
		}
		return nil, 0, fmt.Errorf("%s: %w", name, err)
	}
	// One document: a second one ("---") would otherwise be dropped
	// without a word.
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, 0, fmt.Errorf("%s: %w", name, err)
		}
		return nil, 0, fmt.Errorf("%s:%d: a second YAML document; a policy file holds exactly one", name, extra.Line)
	}
	var errs []error
	// Line numbers: yaml.v3 keeps them on nodes, not on decoded values.
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", name, err)
	}
	if len(root.Content) == 1 {
		m := root.Content[0]
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value == "rules" && m.Content[i+1].Kind == yaml.SequenceNode {
				for j, n := range m.Content[i+1].Content {
					if j < len(f.Rules) {
						f.Rules[j].line = n.Line
					}
				}
			}
		}
	}
	if len(f.Rules) == 0 {
		errs = append(errs, fmt.Errorf("%s: no rules (deny everything is not a useful policy; write it as an explicit rule set)", name))
	}
	var rules []Rule
	for i, fr := range f.Rules {
		where := fmt.Sprintf("%s:%d: rule %d", name, fr.line, i+1)
		if fr.Name != "" {
			where += " (" + fr.Name + ")"
		}
		rs, err := fr.rules()
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
			continue
		}
		for _, r := range rs {
			if _, err := compileRule(r); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", where, err))
			}
		}
		rules = append(rules, rs...)
	}
	if len(errs) > 0 {
		return nil, 0, errors.Join(errs...)
	}
	p, err := Compile(rules)
	if err != nil {
		return nil, 0, err
	}
	return p, len(f.Rules), nil
}

// LoadFile reads and compiles a policy file.
func LoadFile(path string) (*Policy, error) {
	p, _, err := LoadFileRules(path)
	return p, err
}

// LoadFileRules reads and compiles a policy file, and returns the number
// of rules written in it (what an operator counts in the file; Policy.Rules
// has one compiled rule per topic).
func LoadFileRules(path string) (*Policy, int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("policy: %w", err)
	}
	return parseFile(path, b)
}

func (fr FileRule) rules() ([]Rule, error) {
	var errs []error
	if (len(fr.Allow) == 0) == (len(fr.Deny) == 0) {
		errs = append(errs, errors.New("exactly one of allow or deny must list publish, subscribe and/or retain"))
	}
	eff, words := Allow, fr.Allow
	if len(fr.Deny) > 0 {
		eff, words = Deny, fr.Deny
	}
	var acc Access
	for _, w := range words {
		switch strings.ToLower(w) {
		case "publish":
			acc |= Publish
		case "subscribe":
			acc |= Subscribe
		case "retain":
			// Allowing retain allows the publish it rides on; denying
			// retain denies only the retain flag.
			if len(fr.Deny) > 0 {
				acc |= Retain
			} else {
				acc |= Publish | Retain
			}
		default:
			errs = append(errs, fmt.Errorf("unknown access %q (publish, subscribe, retain)", w))
		}
	}
	var roles []identity.Role
	for _, r := range fr.Roles {
		switch identity.Role(r) {
		case identity.RoleDevice, identity.RoleService, identity.RoleOperator:
			roles = append(roles, identity.Role(r))
		default:
			errs = append(errs, fmt.Errorf("unknown role %q (device, service, operator)", r))
		}
	}
	for _, g := range fr.Groups {
		if err := identity.ValidateName(g); err != nil {
			errs = append(errs, fmt.Errorf("group %q: %w", g, err))
		}
	}
	for _, m := range fr.Attestation {
		if m != MethodTPM && m != MethodToken {
			errs = append(errs, fmt.Errorf("unknown attestation method %q (%s, %s)", m, MethodTPM, MethodToken))
		}
	}
	errs = append(errs, checkNames(fr.Names)...)
	if len(fr.Topics) == 0 {
		errs = append(errs, errors.New("no topics"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	out := make([]Rule, 0, len(fr.Topics))
	for _, t := range fr.Topics {
		out = append(out, Rule{Name: fr.Name, Roles: roles, Groups: fr.Groups, Attestation: fr.Attestation, Names: fr.Names, Effect: eff, Access: acc, Filter: t})
	}
	return out, nil
}

// DefaultFile is the shipped default policy, the topic layout of
// docs/policy.md, as an operator would write it.
const DefaultFile = `# fleetgate topic policy. Deny by default: what no rule allows is refused.
# A deny rule wins over every allow rule it overlaps.
rules:
  - name: device-telemetry
    roles: [device]
    allow: [publish]
    topics: ["devices/{id}/telemetry/#"]
  - name: device-state
    roles: [device]
    allow: [publish, retain]
    topics: ["devices/{id}/state"]
  - name: device-commands
    roles: [device]
    allow: [subscribe]
    topics: ["devices/{id}/commands/#"]
  - name: device-broadcast
    roles: [device]
    allow: [subscribe]
    topics: ["groups/{group}/broadcast/#"]
  - name: service-read
    roles: [service]
    allow: [subscribe]
    topics: ["devices/#", "groups/#", "$fleetgate/events/#"]
  - name: service-commands
    roles: [service]
    allow: [publish]
    topics: ["devices/+/commands/#", "groups/+/broadcast/#"]
  - name: operator-all
    roles: [operator]
    allow: [publish, subscribe, retain]
    topics: ["#", "$SYS/#", "$fleetgate/events/#"]
`
