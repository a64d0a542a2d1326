package acl

import (
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/identity"
)

var (
	dev = Subject{Role: identity.RoleDevice, ID: "d1", Group: "g1"}
	svc = Subject{Role: identity.RoleService, ID: "backend"}
	op  = Subject{Role: identity.RoleOperator, ID: "admin"}
)

func TestDefaultPolicyPublish(t *testing.T) {
	p := Default()
	cases := []struct {
		name   string
		s      Subject
		topic  string
		retain bool
		want   bool
	}{
		{"a device publishes its own telemetry", dev, "devices/d1/telemetry/temp", false, true},
		{"a device publishes deep under its own telemetry", dev, "devices/d1/telemetry/a/b/c", false, true},
		{"a device publishes to its telemetry root", dev, "devices/d1/telemetry", false, true},
		{"a device may not publish another device's telemetry", dev, "devices/d2/telemetry/temp", false, false},
		{"a device may not publish to its own commands", dev, "devices/d1/commands/x", false, false},
		{"a device may not retain telemetry", dev, "devices/d1/telemetry/temp", true, false},
		{"a device may retain its state", dev, "devices/d1/state", true, true},
		{"a device may not publish into a group broadcast", dev, "groups/g1/broadcast/x", false, false},
		{"a wildcard in a publish topic is refused", dev, "devices/d1/telemetry/+", false, false},
		{"a hash in a publish topic is refused", dev, "devices/d1/telemetry/#", false, false},
		{"an empty level does not match the ID", dev, "devices//telemetry/x", false, false},
		{"a prefix of the ID does not match", dev, "devices/d/telemetry/x", false, false},
		{"an extension of the ID does not match", dev, "devices/d1x/telemetry/x", false, false},
		{"an empty topic is refused", dev, "", false, false},
		{"NUL in a topic is refused", dev, "devices/d1/telemetry/\x00", false, false},
		{"a very long own topic is allowed", dev, "devices/d1/telemetry/" + strings.Repeat("x/", 2000) + "x", false, true},
		{"non-UTF-8 bytes under own telemetry are just bytes", dev, "devices/d1/telemetry/\xff\xfe", false, true},
		{"a service commands a device", svc, "devices/d9/commands/reboot", false, true},
		{"a service broadcasts to a group", svc, "groups/g1/broadcast/fw", false, true},
		{"a service may not forge telemetry", svc, "devices/d9/telemetry/t", false, false},
		{"an operator may publish anywhere", op, "devices/d9/telemetry/t", false, true},
		{"an unknown role gets nothing", Subject{Role: "x", ID: "d1"}, "devices/d1/telemetry/t", false, false},
		{"a device with an unsafe ID value gets nothing", Subject{Role: identity.RoleDevice, ID: "+"}, "devices/+/telemetry/t", false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := p.CheckPublish(tc.s, tc.topic, tc.retain).Allowed; got != tc.want {
				t.Fatalf("CheckPublish(%v, %q, retain=%v) = %v, want %v", tc.s, tc.topic, tc.retain, got, tc.want)
			}
		})
	}
}

func TestDefaultPolicySubscribe(t *testing.T) {
	p := Default()
	cases := []struct {
		name   string
		s      Subject
		filter string
		want   bool
	}{
		{"a device subscribes to its own commands", dev, "devices/d1/commands/#", true},
		{"a device subscribes to one of its commands", dev, "devices/d1/commands/reboot", true},
		{"a device subscribes with + inside its commands", dev, "devices/d1/commands/+/x", true},
		{"a device subscribes to its commands root", dev, "devices/d1/commands", true},
		{"devices/# is not inside devices/{id}/commands/#", dev, "devices/#", false},
		{"devices/+/commands is not inside a device's own commands", dev, "devices/+/commands/#", false},
		{"another device's commands are refused", dev, "devices/d2/commands/#", false},
		{"# is refused for a device", dev, "#", false},
		{"+/+/commands/# is refused for a device", dev, "+/+/commands/#", false},
		{"a device subscribes to its group broadcast", dev, "groups/g1/broadcast/#", true},
		{"a device may not read another group's broadcast", dev, "groups/g2/broadcast/#", false},
		{"a device may not read groups/+/broadcast", dev, "groups/+/broadcast/#", false},
		{"a device may not read $SYS", dev, "$SYS/#", false},
		{"$share on own commands is checked on the real filter", dev, "$share/grp/devices/d1/commands/#", true},
		{"$share cannot smuggle devices/#", dev, "$share/grp/devices/#", false},
		{"a malformed $share is refused", dev, "$share/devices/#", false},
		{"a $share name with a wildcard is refused", dev, "$share/+/devices/d1/commands/#", false},
		{"a filter with # not last is refused", dev, "devices/d1/commands/#/x", false},
		{"a filter mixing # into a level is refused", dev, "devices/d1/commands/a#", false},
		{"an empty filter is refused", dev, "", false},
		{"a service reads fleet telemetry", svc, "devices/+/telemetry/#", true},
		{"devices/+/telemetry/# is inside itself for a service", svc, "devices/+/telemetry/#", true},
		{"a service reads all device topics", svc, "devices/#", true},
		{"a service may not read $SYS", svc, "$SYS/#", false},
		{"a service may not read #", svc, "#", false},
		{"a service reads fleetgate events", svc, "$fleetgate/events/#", true},
		{"an operator reads $SYS", op, "$SYS/#", true},
		{"an operator reads everything", op, "#", true},
		{"an operator reads a $SYS topic through its $SYS rule", op, "$SYS/broker/x", true},
		{"a # rule alone does not reach $SYS", svc, "$SYS/broker/x", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := p.CheckSubscribe(tc.s, tc.filter).Allowed; got != tc.want {
				t.Fatalf("CheckSubscribe(%v, %q) = %v, want %v", tc.s, tc.filter, got, tc.want)
			}
		})
	}
}

func TestDenyRulesWinAndGroupsScopeRules(t *testing.T) {
	p, err := Compile([]Rule{
		{Name: "deny-secret", Roles: []identity.Role{identity.RoleService}, Effect: Deny, Access: Subscribe, Filter: "devices/+/telemetry/secret"},
		{Name: "svc", Roles: []identity.Role{identity.RoleService}, Access: Subscribe, Filter: "devices/#"},
		{Name: "lab-only", Roles: []identity.Role{identity.RoleDevice}, Groups: []string{"lab"}, Access: Publish, Filter: "lab/{group}/{id}"},
	})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		got  bool
		want bool
	}{
		{"a deny rule beats an allow on the exact topic", p.CheckSubscribe(svc, "devices/d1/telemetry/secret").Allowed, false},
		{"a deny rule beats an allow on a wider filter that overlaps it", p.CheckSubscribe(svc, "devices/#").Allowed, false},
		{"a filter disjoint from the deny rule is allowed", p.CheckSubscribe(svc, "devices/d1/state").Allowed, true},
		{"a group rule applies to its group", p.CheckPublish(Subject{Role: identity.RoleDevice, ID: "d1", Group: "lab"}, "lab/lab/d1", false).Allowed, true},
		{"a group rule does not apply to another group", p.CheckPublish(Subject{Role: identity.RoleDevice, ID: "d1", Group: "prod"}, "lab/prod/d1", false).Allowed, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.got != tc.want {
				t.Fatalf("got %v, want %v", tc.got, tc.want)
			}
		})
	}
}

func TestCompileReportsEveryError(t *testing.T) {
	_, err := Compile([]Rule{
		{Name: "a", Access: Publish, Filter: "x/#/y"},
		{Name: "b", Access: 0, Filter: "x"},
		{Name: "c", Access: Publish, Filter: "x/{idx}"},
		{Name: "d", Roles: []identity.Role{"root"}, Access: Publish, Filter: "x"},
	})
	if err == nil {
		t.Fatal("bad rules compiled")
	}
	for _, n := range []string{"rule 1 (a)", "rule 2 (b)", "rule 3 (c)", "rule 4 (d)"} {
		if !strings.Contains(err.Error(), n) {
			t.Errorf("error does not name %s: %v", n, err)
		}
	}
}

// contains must agree with brute force over a small topic universe: every
// topic matched by the requested filter must be matched by the rule.
func TestContainsAgreesWithMatching(t *testing.T) {
	levels := []string{"a", "b", "+", "#"}
	var filters []string
	var gen func(prefix []string, depth int)
	gen = func(prefix []string, depth int) {
		if len(prefix) > 0 {
			filters = append(filters, strings.Join(prefix, "/"))
		}
		if depth == 0 || (len(prefix) > 0 && prefix[len(prefix)-1] == "#") {
			return
		}
		for _, l := range levels {
			gen(append(append([]string{}, prefix...), l), depth-1)
		}
	}
	gen(nil, 3)
	var topics []string
	var genT func(prefix []string, depth int)
	genT = func(prefix []string, depth int) {
		if len(prefix) > 0 {
			topics = append(topics, strings.Join(prefix, "/"))
		}
		if depth == 0 {
			return
		}
		for _, l := range []string{"a", "b", "c"} {
			genT(append(append([]string{}, prefix...), l), depth-1)
		}
	}
	genT(nil, 4)
	for _, rf := range filters {
		p, err := Compile([]Rule{{Name: "r", Access: Subscribe, Filter: rf}})
		if err != nil {
			t.Fatal(err)
		}
		for _, ff := range filters {
			inside := true
			for _, topic := range topics {
				if matches(ff, topic) && !matches(rf, topic) {
					inside = false
					break
				}
			}
			got := p.CheckSubscribe(dev, ff).Allowed
			// The 4-level universe can't see that a/# reaches deeper than
			// any rule of 3 levels; the checker is stricter there, never
			// looser.
			if got && !inside {
				t.Fatalf("filter %q reported inside %q but %q escapes", ff, rf, ff)
			}
			if !got && inside && !strings.HasSuffix(ff, "#") {
				t.Fatalf("filter %q is inside %q but was refused", ff, rf)
			}
		}
	}
}

// matches is the reference MQTT matcher for wildcard-free topics.
func matches(filter, topic string) bool {
	f := strings.Split(filter, "/")
	tp := strings.Split(topic, "/")
	for i, l := range f {
		if l == "#" {
			return true
		}
		if i >= len(tp) {
			return false
		}
		if l != "+" && l != tp[i] {
			return false
		}
	}
	return len(f) == len(tp)
}

func FuzzCheckSubscribe(f *testing.F) {
	for _, s := range []string{"devices/#", "devices/d1/commands/#", "$share/x/devices/d1/commands/+", "+/#", "a//b", "#/x"} {
		f.Add(s)
	}
	p := Default()
	f.Fuzz(func(t *testing.T, filter string) {
		d := p.CheckSubscribe(dev, filter)
		if !d.Allowed {
			return
		}
		// Whatever a device may subscribe to stays inside its own topics.
		real := stripShare(filter)
		if !strings.HasPrefix(real, "devices/d1/commands") && !strings.HasPrefix(real, "groups/g1/broadcast") {
			t.Fatalf("device allowed %q", filter)
		}
	})
}

func FuzzCompile(f *testing.F) {
	for _, s := range []string{"devices/{id}/#", "a/+/b", "#", "{group}/x", "x/#/y", "{id}{id}"} {
		f.Add(s, "devices/d1/x")
	}
	f.Fuzz(func(t *testing.T, filter, topic string) {
		p, err := Compile([]Rule{{Name: "f", Access: Publish | Subscribe, Filter: filter}})
		if err != nil {
			return
		}
		_ = p.CheckPublish(dev, topic, false)
		_ = p.CheckSubscribe(dev, topic)
	})
}

func BenchmarkCheckPublish(b *testing.B) {
	p := Default()
	b.ReportAllocs()
	for b.Loop() {
		if !p.CheckPublish(dev, "devices/d1/telemetry/temp", false).Allowed {
			b.Fatal("denied")
		}
	}
}

func BenchmarkCheckSubscribeDenied(b *testing.B) {
	p := Default()
	b.ReportAllocs()
	for b.Loop() {
		if p.CheckSubscribe(dev, "devices/#").Allowed {
			b.Fatal("allowed")
		}
	}
}

func TestCheckDoesNotAllocate(t *testing.T) {
	p := Default()
	n := testing.AllocsPerRun(100, func() {
		p.CheckPublish(dev, "devices/d1/telemetry/temp", false)
		p.CheckSubscribe(svc, "devices/+/telemetry/#")
		p.CheckSubscribe(dev, "$share/g/devices/d1/commands/#")
	})
	if n != 0 {
		t.Fatalf("checks allocate %v times per run", n)
	}
}
