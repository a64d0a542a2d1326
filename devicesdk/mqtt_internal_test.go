package devicesdk

import "testing"

func TestTopicMatches(t *testing.T) {
	cases := []struct {
		filter, topic string
		want          bool
	}{
		{"devices/d1/commands/#", "devices/d1/commands/reboot", true},
		{"devices/d1/commands/#", "devices/d1/commands", true},
		{"devices/d1/commands/#", "devices/d1/commandsx", false},
		{"devices/+/commands/x", "devices/d9/commands/x", true},
		{"devices/+/commands/x", "devices/d9/commands/y", false},
		{"a/b", "a/b/c", false},
		{"a/b/c", "a/b", false},
		{"#", "anything/at/all", true},
		{"a/+", "a/", true},
	}
	for _, tc := range cases {
		if got := topicMatches(tc.filter, tc.topic); got != tc.want {
			t.Errorf("topicMatches(%q, %q) = %v, want %v", tc.filter, tc.topic, got, tc.want)
		}
	}
}
