package broker

import (
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// A retained message is of its publisher; one stored before origins were
// kept through the fan-out client is of the device its topic names.
func TestRetainedDeviceAttribution(t *testing.T) {
	for _, tc := range []struct {
		origin, topic, want string
	}{
		{"sensor-1", "devices/sensor-1/state", "sensor-1"},
		{"backend", "services/backend/status", "backend"},
		{fanoutClientID, "devices/sensor-2/state", "sensor-2"},
		{"", "devices/sensor-3/state", "sensor-3"},
		{fanoutClientID, "other/topic", ""},
	} {
		if got := retainedDevice(packets.Packet{Origin: tc.origin, TopicName: tc.topic}); got != tc.want {
			t.Errorf("origin %q topic %q: device %q, want %q", tc.origin, tc.topic, got, tc.want)
		}
	}
}
