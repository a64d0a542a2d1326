package acl

import (
	"fmt"
	"strings"

	"github.com/fleetgate/fleetgate/fleet"
)

// Attestation methods a rule may require (attestation: [...]), as the
// registry records them on a device.
const (
	MethodTPM   = fleet.MethodTPM
	MethodToken = fleet.MethodToken
)

// condition is the rule's scope beyond its filter, for explanations:
// ", roles device, groups lab, attestation tpm" (empty: everyone).
func (r Rule) condition() string {
	var b strings.Builder
	if len(r.Roles) > 0 {
		rs := make([]string, len(r.Roles))
		for i, x := range r.Roles {
			rs[i] = string(x)
		}
		fmt.Fprintf(&b, ", roles %s", strings.Join(rs, "|"))
	}
	if len(r.Groups) > 0 {
		fmt.Fprintf(&b, ", groups %s", strings.Join(r.Groups, "|"))
	}
	if len(r.Attestation) > 0 {
		fmt.Fprintf(&b, ", attestation %s", strings.Join(r.Attestation, "|"))
	}
	return b.String()
}

// Miss is a rule whose filter covers the request but which did not apply
// to the subject, and why: what `policy explain` shows so that an operator
// sees, say, that a TPM-only rule missed a token-enrolled device.
type Miss struct {
	Rule   Rule
	Reason string
}

// Misses returns the rules that would have decided a publish to topic
// (subscribe: publish false, topic a filter) if they applied to s, but do
// not apply to it, each with the condition s fails. Explanations only: not
// on any hot path.
func (p *Policy) Misses(s Subject, topic string, publish, retain bool) []Miss {
	want := Subscribe
	if publish {
		want = Publish
		if retain {
			want |= Retain
		}
	} else {
		topic = stripShare(topic)
	}
	var out []Miss
	for i := range p.rules {
		c := &p.rules[i]
		if c.Access&want == 0 || c.applies(&s) {
			continue
		}
		// The filter as if the rule applied.
		covers := c.overlaps(&s, topic)
		if c.Effect == Allow {
			covers = c.contains(&s, topic)
		}
		if !covers {
			continue
		}
		out = append(out, Miss{Rule: c.Rule, Reason: c.why(&s)})
	}
	return out
}

// why names the first condition of the rule that s fails.
func (c *compiled) why(s *Subject) string {
	if c.roles != 0 && c.roles&roleBit(s.Role) == 0 {
		rs := make([]string, len(c.Roles))
		for i, x := range c.Roles {
			rs[i] = string(x)
		}
		return fmt.Sprintf("the rule is for role %s, the subject's role is %s", strings.Join(rs, " or "), orNone(string(s.Role)))
	}
	if len(c.Attestation) > 0 && !contains(c.Attestation, s.Attestation) {
		return fmt.Sprintf("the rule requires attestation %s, the subject's is %s", strings.Join(c.Attestation, " or "), orNone(s.Attestation))
	}
	if len(c.Groups) > 0 && !contains(c.Groups, s.Group) {
		return fmt.Sprintf("the rule is for groups %s, the subject's group is %s", strings.Join(c.Groups, ", "), orNone(s.Group))
	}
	return "does not apply"
}

func orNone(v string) string {
	if v == "" {
		return "(none)"
	}
	return v
}

// Describe is the rule as one line: "allow publish devices/+/ota/#
// (roles device, attestation tpm)".
func (r Rule) Describe() string {
	eff := "allow"
	if r.Effect == Deny {
		eff = "deny"
	}
	var acc []string
	for _, a := range []struct {
		bit  Access
		name string
	}{{Publish, "publish"}, {Subscribe, "subscribe"}, {Retain, "retain"}} {
		if r.Access&a.bit != 0 {
			acc = append(acc, a.name)
		}
	}
	s := fmt.Sprintf("%s %s %s", eff, strings.Join(acc, "+"), r.Filter)
	if cond := r.condition(); cond != "" {
		s += " (" + cond[2:] + ")"
	}
	return s
}
