package broker

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/identity"
)

// Each role gets its queue policy; a connection whose role is unknown (not
// ours, or a certificate without a fleetgate identity) gets the device's,
// the smaller one.
func TestQueuePolicyByRole(t *testing.T) {
	b := &Broker{cfg: Config{Queues: Queues{}.withDefaults()}}
	for _, tc := range []struct {
		role identity.Role
		want mqtt.QueuePolicy
	}{
		{identity.RoleDevice, DefaultQueues.Device},
		{identity.RoleService, DefaultQueues.Service},
		{identity.RoleOperator, DefaultQueues.Service},
		{"", DefaultQueues.Device},
	} {
		cl := &mqtt.Client{Net: mqtt.ClientConnection{Conn: &conn{role: tc.role}}}
		if got := b.queuePolicy(cl); got != tc.want {
			t.Errorf("role %q: policy %+v, want %+v", tc.role, got, tc.want)
		}
	}
	if got := b.queuePolicy(&mqtt.Client{}); got != DefaultQueues.Device {
		t.Errorf("no connection: %+v, want the device policy", got)
	}
	if DefaultQueues.Device.Size >= DefaultQueues.Service.Size {
		t.Error("a device's queue should be the small one")
	}
}
