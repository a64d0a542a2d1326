// Package acl turns an identity into what it may do on the broker. A Policy
// is a list of rules, compiled once into per-level matchers with
// placeholders ({id}, {group}); a check walks the topic in place and does not
// allocate. It is pure: no I/O, no locks, table-tested.
//
// Semantics:
//   - Deny by default: no matching allow rule means deny; a matching deny
//     rule wins over any allow.
//   - Publish checks the concrete topic name.
//   - Subscribe checks that the requested filter lies *inside* an allowed
//     filter: every topic the requested filter can match must be matched by
//     the rule (devices/# is not inside devices/{id}/commands/#).
//   - $share/<name>/<filter> is checked on <filter>.
//   - Wildcards in a rule never match a first level starting with '$'
//     [MQTT-4.7.2-1]; only literal rules ($SYS/#) reach those.
//   - A placeholder whose value is empty or contains / + # $ or NUL never
//     matches, so a value can never widen a rule.
package acl

import (
	"errors"
	"fmt"
	"strings"

	"github.com/fleetgate/fleetgate/identity"
)

// Access is what a rule grants or denies.
type Access uint8

// Access bits.
const (
	Publish Access = 1 << iota
	Subscribe
	// Retain permits the retain flag on publish.
	Retain
)

// Effect of a rule.
type Effect uint8

// Effects.
const (
	Allow Effect = iota
	Deny
)

// Rule is one policy rule before compilation.
type Rule struct {
	// Name identifies the rule in explanations and errors.
	Name string
	// Roles the rule applies to; empty: every role.
	Roles []identity.Role
	// Groups the rule applies to (devices); empty: every group.
	Groups []string
	// Attestation methods the rule applies to (devices enrolled with one
	// of them: "tpm", "token"); empty: every subject. A rule that names
	// methods never applies to a subject without one (services,
	// operators, a device whose method is unknown).
	Attestation []string
	// Names the rule applies to (identity names, e.g. one service's);
	// empty: every name (names.go).
	Names  []string
	Effect Effect
	Access Access
	// Filter is an MQTT filter with optional placeholder levels {id} and
	// {group}.
	Filter string
}

// Subject is who asks.
type Subject struct {
	Role  identity.Role
	ID    string
	Group string
	// Tags are the device's tags from the registry ({tag:NAME}).
	Tags map[string]string
	// Attestation is how the device enrolled (fleet.MethodTPM,
	// fleet.MethodToken; "" for services and operators).
	Attestation string
}

// Decision is the outcome of a check and the rule that decided it (-1: the
// default deny).
type Decision struct {
	Allowed bool
	Rule    int
}

// levelKind of a compiled filter level.
type levelKind uint8

const (
	litLevel levelKind = iota
	plusLevel
	hashLevel
	idLevel
	groupLevel
	tagLevel
)

type level struct {
	kind levelKind
	lit  string
}

type compiled struct {
	Rule
	levels []level
	roles  uint8 // bit set of roles; 0 = all
}

// Policy is a compiled, immutable rule set. Safe for concurrent use.
type Policy struct {
	rules []compiled
}

// ErrInvalidRule: a rule does not compile.
var ErrInvalidRule = errors.New("acl: invalid rule")

func roleBit(r identity.Role) uint8 {
	switch r {
	case identity.RoleDevice:
		return 1
	case identity.RoleService:
		return 2
	case identity.RoleOperator:
		return 4
	}
	return 0
}

// Compile checks and compiles rules. All errors are reported together.
func Compile(rules []Rule) (*Policy, error) {
	p := &Policy{}
	var errs []error
	for i, r := range rules {
		c, err := compileRule(r)
		if err != nil {
			errs = append(errs, fmt.Errorf("rule %d (%s): %w", i+1, r.Name, err))
			continue
		}
		p.rules = append(p.rules, c)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return p, nil
}

func compileRule(r Rule) (compiled, error) {
	c := compiled{Rule: r}
	if r.Access == 0 || r.Access&^(Publish|Subscribe|Retain) != 0 {
		return c, fmt.Errorf("%w: access must be publish, subscribe and/or retain", ErrInvalidRule)
	}
	for _, role := range r.Roles {
		b := roleBit(role)
		if b == 0 {
			return c, fmt.Errorf("%w: unknown role %q", ErrInvalidRule, role)
		}
		c.roles |= b
	}
	if r.Filter == "" {
		return c, fmt.Errorf("%w: empty filter", ErrInvalidRule)
	}
	parts := strings.Split(r.Filter, "/")
	for i, p := range parts {
		switch {
		case p == "#":
			if i != len(parts)-1 {
				return c, fmt.Errorf("%w: '#' must be the last level in %q", ErrInvalidRule, r.Filter)
			}
			c.levels = append(c.levels, level{kind: hashLevel})
		case p == "+":
			c.levels = append(c.levels, level{kind: plusLevel})
		case p == "{id}":
			c.levels = append(c.levels, level{kind: idLevel})
		case p == "{group}":
			c.levels = append(c.levels, level{kind: groupLevel})
		case strings.HasPrefix(p, "{tag:") && strings.HasSuffix(p, "}"):
			name := p[len("{tag:") : len(p)-1]
			if identity.ValidateName(name) != nil {
				return c, fmt.Errorf("%w: tag name %q in %q must be [a-z0-9-]", ErrInvalidRule, name, r.Filter)
			}
			c.levels = append(c.levels, level{kind: tagLevel, lit: name})
		case strings.ContainsAny(p, "+#{}\x00"):
			return c, fmt.Errorf("%w: level %q of %q mixes wildcards or braces with text", ErrInvalidRule, p, r.Filter)
		default:
			c.levels = append(c.levels, level{kind: litLevel, lit: p})
		}
	}
	return c, nil
}

// safeValue reports whether a placeholder value may be substituted.
func safeValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		switch v[i] {
		case '/', '+', '#', '$', 0:
			return false
		}
	}
	return true
}

func (c *compiled) applies(s *Subject) bool {
	if c.roles != 0 && c.roles&roleBit(s.Role) == 0 {
		return false
	}
	if !c.appliesToName(s.ID) {
		return false
	}
	if len(c.Attestation) > 0 && !contains(c.Attestation, s.Attestation) {
		return false
	}
	if len(c.Groups) > 0 {
		return contains(c.Groups, s.Group)
	}
	return true
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// CheckPublish decides whether s may publish to topic (with retain if set).
func (p *Policy) CheckPublish(s Subject, topic string, retain bool) Decision {
	if topic == "" || strings.ContainsAny(topic, "+#\x00") {
		return Decision{Rule: -1}
	}
	want := Publish
	if retain {
		want |= Retain
	}
	return p.decide(&s, topic, want)
}

// CheckSubscribe decides whether s may subscribe to filter.
func (p *Policy) CheckSubscribe(s Subject, filter string) Decision {
	filter = stripShare(filter)
	if !validFilter(filter) {
		return Decision{Rule: -1}
	}
	return p.decide(&s, filter, Subscribe)
}

// stripShare returns the real filter of $share/<name>/<filter>; a malformed
// shared filter returns "" (invalid, denied).
func stripShare(f string) string {
	rest, ok := strings.CutPrefix(f, "$share/")
	if !ok {
		return f
	}
	i := strings.IndexByte(rest, '/')
	if i <= 0 || strings.ContainsAny(rest[:i], "+#") {
		return ""
	}
	return rest[i+1:]
}

// validFilter: non-empty, '#' only as a whole last level, '+' only as a
// whole level, no NUL.
func validFilter(f string) bool {
	if f == "" {
		return false
	}
	start := 0
	for i := 0; i <= len(f); i++ {
		if i < len(f) && f[i] != '/' {
			if f[i] == 0 {
				return false
			}
			continue
		}
		lvl := f[start:i]
		if strings.ContainsAny(lvl, "+#") && len(lvl) != 1 {
			return false
		}
		if lvl == "#" && i != len(f) {
			return false
		}
		start = i + 1
	}
	return true
}

// decide: a deny rule covering the request wins; else the first allow rule
// granting all of want; else default deny. For Publish|Retain, one allow rule
// must grant both.
func (p *Policy) decide(s *Subject, f string, want Access) Decision {
	allow := -1
	for i := range p.rules {
		c := &p.rules[i]
		if !c.applies(s) {
			continue
		}
		if c.Effect == Deny {
			// A deny rule for any of the wanted accesses that overlaps.
			if c.Access&want != 0 && c.overlaps(s, f) {
				return Decision{Rule: i}
			}
			continue
		}
		if allow < 0 && c.Access&want == want && c.contains(s, f) {
			allow = i
		}
	}
	if allow >= 0 {
		return Decision{Allowed: true, Rule: allow}
	}
	return Decision{Rule: -1}
}

// value of a placeholder level for s.
func (c *compiled) value(l *level, s *Subject) (string, bool) {
	switch l.kind {
	case idLevel:
		return s.ID, safeValue(s.ID)
	case groupLevel:
		return s.Group, safeValue(s.Group)
	case tagLevel:
		v := s.Tags[l.lit]
		return v, safeValue(v)
	}
	return l.lit, true
}

// contains reports whether every topic matched by filter f is matched by the
// rule's filter (for a topic name, f matches only itself, so this is plain
// matching).
func (c *compiled) contains(s *Subject, f string) bool {
	pos := 0
	for li := range c.levels {
		l := &c.levels[li]
		if l.kind == hashLevel {
			// '#' matches the parent level too, and every level below; but
			// a wildcard never reaches a '$' first level.
			return !(li == 0 && strings.HasPrefix(f, "$"))
		}
		if pos > len(f) {
			return false // f has fewer levels than the rule
		}
		seg, next := nextLevel(f, pos)
		switch l.kind {
		case plusLevel:
			if seg == "#" || (li == 0 && strings.HasPrefix(seg, "$")) {
				return false
			}
		default:
			v, ok := c.value(l, s)
			if !ok || seg != v {
				return false
			}
		}
		pos = next
	}
	return pos > len(f) // both ended together
}

// overlaps reports whether some topic is matched by both the rule's filter
// and f (used for deny rules: deny wins wherever they intersect).
func (c *compiled) overlaps(s *Subject, f string) bool {
	pos := 0
	for li := range c.levels {
		l := &c.levels[li]
		if pos > len(f) {
			// f ended; the rule still has levels: overlap only if the rest
			// is a lone '#' (parent-level match).
			return l.kind == hashLevel && li == len(c.levels)-1
		}
		seg, next := nextLevel(f, pos)
		if seg == "#" || l.kind == hashLevel {
			return true
		}
		if seg != "+" && l.kind != plusLevel {
			v, ok := c.value(l, s)
			if !ok || seg != v {
				return false
			}
		}
		pos = next
	}
	if pos > len(f) {
		return true
	}
	seg, _ := nextLevel(f, pos)
	return seg == "#" // rule ended; f goes on only with "#" (parent match)
}

// nextLevel returns the level of f starting at pos and the start of the next
// level (len(f)+1 when this was the last).
func nextLevel(f string, pos int) (string, int) {
	i := strings.IndexByte(f[pos:], '/')
	if i < 0 {
		return f[pos:], len(f) + 1
	}
	return f[pos : pos+i], pos + i + 1
}

// Rules returns the rules of p, in order.
func (p *Policy) Rules() []Rule {
	out := make([]Rule, len(p.rules))
	for i := range p.rules {
		out[i] = p.rules[i].Rule
	}
	return out
}

// Default returns the compiled default policy (DefaultFile).
func Default() *Policy {
	p, err := ParseFile("default policy", []byte(DefaultFile))
	if err != nil {
		panic(err) // a constant; TestDefaultPolicyCompiles keeps it valid
	}
	return p
}

// Explain describes a decision for humans: allow/deny and the rule.
func (p *Policy) Explain(d Decision) string {
	verdict := "deny"
	if d.Allowed {
		verdict = "allow"
	}
	if d.Rule < 0 || d.Rule >= len(p.rules) {
		return verdict + " (no rule allows it: deny by default)"
	}
	r := p.rules[d.Rule]
	kind := "allow"
	if r.Effect == Deny {
		kind = "deny"
	}
	return fmt.Sprintf("%s by rule %q (%s %s%s)", verdict, r.Name, kind, r.Filter, r.condition())
}
