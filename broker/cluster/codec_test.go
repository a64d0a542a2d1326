package cluster

import (
	"testing"
	"time"

	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// The codec is reversible for any topic, and never writes a token NATS
// would read as a wildcard, a separator or nothing.
func TestTopicCodecRoundTrip(t *testing.T) {
	for _, topic := range []string{"a/b/c", "devices/dev-1/telemetry/t", "/leading", "trailing/", "a//b", "",
		"a.b/c d/*/>/~7E/~", "$SYS/broker", "ünïcode/日本", "a+b/c#d", "_/-/~"} {
		enc := EncodeTopic(topic)
		for _, tok := range splitTokens(enc) {
			if tok == "" || tok == "*" || tok == ">" {
				t.Fatalf("%q: token %q in %q", topic, tok, enc)
			}
			for i := 0; i < len(tok); i++ {
				if c := tok[i]; c == ' ' || c == '\t' || c == '*' || c == '>' || c == '.' {
					t.Fatalf("%q: byte %q in token %q", topic, c, tok)
				}
			}
		}
		dec, ok := DecodeTopic(enc)
		if !ok || dec != topic {
			t.Fatalf("%q → %q → %q (%v)", topic, enc, dec, ok)
		}
	}
	for _, bad := range []string{"a..b", "~4", "~ZZ", "a~"} {
		if _, ok := DecodeTopic(bad); ok {
			t.Fatalf("DecodeTopic(%q) accepted", bad)
		}
	}
}

func splitTokens(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == '.' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return out
}

// Filters become subject patterns that NATS matches against encoded
// topics exactly as MQTT matches the filter (the '$' rule apart: the
// broker matches again).
func TestFilterSubjectsMatchLikeMQTT(t *testing.T) {
	cases := []struct {
		filter string
		match  []string
		miss   []string
	}{
		{"a/+/c", []string{"a/b/c", "a//c"}, []string{"a/b/c/d", "a/c", "x/b/c"}},
		{"a/#", []string{"a", "a/b", "a/b/c", "a/"}, []string{"b", "ab"}},
		{"#", []string{"a", "a/b", "/"}, nil},
		{"+", []string{"a", ""}, []string{"a/b"}},
		{"devices/+/telemetry/#", []string{"devices/d1/telemetry", "devices/d1/telemetry/x/y"}, []string{"devices/d1/state"}},
		{"$share/g/a/+", []string{"a/b"}, []string{"a/b/c"}},
		{"a.b/c d", []string{"a.b/c d"}, []string{"a/b/c d"}},
	}
	for _, c := range cases {
		pats := EncodeFilter(c.filter)
		matches := func(topic string) bool {
			subj := "x." + EncodeTopic(topic)
			for _, p := range pats {
				if subjectMatches("x."+p, subj) {
					return true
				}
			}
			return false
		}
		for _, m := range c.match {
			if !matches(m) {
				t.Errorf("%q (%v) does not match %q", c.filter, pats, m)
			}
		}
		for _, m := range c.miss {
			if matches(m) {
				t.Errorf("%q (%v) matches %q", c.filter, pats, m)
			}
		}
	}
}

// subjectMatches is nats-server's own matching.
func subjectMatches(pattern, subject string) bool {
	return natsserver.SubjectMatchesFilter(subject, pattern)
}

// One NATS subscription per distinct subject, whatever the number of
// clients using it; the last client leaving removes it.
func TestSubscriptionsAreReferenceCounted(t *testing.T) {
	opts := &natsserver.Options{Host: "127.0.0.1", Port: -1, NoSigs: true, NoLog: true}
	ns, err := natsserver.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	r, err := New(Config{NC: nc, Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.close)
	set := func(filters ...string) map[string]struct{} {
		out := map[string]struct{}{}
		for _, f := range filters {
			for _, s := range EncodeFilter(f) {
				out[SubjectPrefix+".*."+s] = struct{}{}
			}
		}
		return out
	}
	base := int(ns.NumSubscriptions()) // the server's own
	for i := range 100 {
		r.setSubjects("svc-"+string(rune('a'+i%26))+string(rune('a'+i/26)), set("devices/+/telemetry/#", "groups/g/broadcast"))
	}
	if got := r.Subscriptions(); got != 3 {
		t.Fatalf("100 clients, 2 filters: %d NATS subscriptions, want 3", got)
	}
	if got := int(ns.NumSubscriptions()) - base; got != 3 {
		t.Fatalf("the server holds %d subscriptions, want 3", got)
	}
	for i := range 100 {
		r.setSubjects("svc-"+string(rune('a'+i%26))+string(rune('a'+i/26)), set("groups/g/broadcast"))
	}
	if got := r.Subscriptions(); got != 1 {
		t.Fatalf("after dropping a filter: %d NATS subscriptions, want 1", got)
	}
	for i := range 100 {
		r.setSubjects("svc-"+string(rune('a'+i%26))+string(rune('a'+i/26)), nil)
	}
	if got := r.Subscriptions(); got != 0 {
		t.Fatalf("every client gone: %d NATS subscriptions, want 0", got)
	}
}

// A replay reads the stream up to its barrier (replay.go), a message whose
// subject no MQTT topic may route to: a device publishing to a topic that
// looks like one must not end another session's replay early, nor be
// dropped by the nodes' feeds as a barrier.
func TestNoTopicRoutesAsAReplayBarrier(t *testing.T) {
	if !isMark(SubjectPrefix + ".1." + markToken + ".x") {
		t.Fatal("a barrier's subject is not recognised")
	}
	for _, topic := range []string{"$mark", "$mark/x", "$mark/x/y", "$mark.x", "devices/$mark/x", "$", "~24mark/x", "$mark/+", "$mark/#"} {
		subject := SubjectPrefix + ".1." + EncodeTopic(topic)
		if isMark(subject) {
			t.Errorf("topic %q routes as %q, a replay barrier", topic, subject)
		}
	}
}
