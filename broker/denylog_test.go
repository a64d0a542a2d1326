package broker_test

import (
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestACLDenialIsOneLineAndBadgerIsQuiet: an MQTT 3.1.1 QoS 1 publish to a
// denied topic (the broker disconnects a 3.1.1 client for it) is logged as
// one line naming the identity, the topic and the rule, never as a dump of
// the packet; and stopping the broker does not pour badger's tables into
// the operator's log.
func TestACLDenialIsOneLineAndBadgerIsQuiet(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	cert := certOf(t, g.EnrollDevice(t, "deny-dev", "lab"))
	c, err := g.MQTT(t, "deny-dev", &cert)
	if err != nil {
		t.Fatal(err)
	}
	const topic = "devices/other-dev/commands/unlock"
	c.Publish(topic, 1, false, "PAYLOAD-SECRET").WaitTimeout(5 * time.Second)
	testenv.Eventually(t, 10*time.Second, func() error {
		if !strings.Contains(g.Logs.String(), `msg="acl denied"`) {
			return errRefused
		}
		return nil
	})
	g.Stop()
	var denied []string
	for _, l := range strings.Split(g.Logs.String(), "\n") {
		if strings.Contains(l, topic) && !strings.Contains(l, "level=DEBUG") {
			denied = append(denied, l)
		}
	}
	if len(denied) != 1 {
		t.Fatalf("%d log lines (info and above) about the denied publish, want 1:\n%s", len(denied), strings.Join(denied, "\n"))
	}
	for _, want := range []string{"identity=device/deny-dev", "direction=publish", "topic=" + topic, `rule="deny (no rule allows it: deny by default)"`} {
		if !strings.Contains(denied[0], want) {
			t.Errorf("denial line lacks %s:\n%s", want, denied[0])
		}
	}
	logs := g.Logs.String()
	for _, dump := range []string{"PAYLOAD-SECRET", "FixedHeader", "pk="} {
		if strings.Contains(logs, dump) {
			t.Errorf("log holds a packet dump (%q)", dump)
		}
	}
	for _, l := range strings.Split(logs, "\n") {
		low := strings.ToLower(l)
		mochi := strings.Contains(low, `msg="added hook"`) || strings.Contains(low, `msg="stopping hook"`)
		if strings.Contains(low, "hook=fleetgate-storage") && !mochi && (strings.Contains(low, "level=info") || strings.Contains(low, "level=debug")) ||
			strings.Contains(low, "numtables") || strings.Contains(low, "l0 stalled") {
			t.Errorf("badger's chatter in the log: %s", l)
		}
	}
}
