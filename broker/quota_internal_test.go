package broker

import (
	"testing"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/fleetgate/fleetgate/directory"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// principals is a directory that knows names and their roles only.
func principals(names map[string]identity.Role) *directory.Directory {
	d := directory.New()
	for n, r := range names {
		d.Load(&fleet.Certificate{Serial: n, Role: r, Name: n})
	}
	return d
}

// A session restored from the store has no connection: its offline quota
// follows its name's role in the registry (a service's session keeps the
// service quota across a restart), and a name the registry does not know
// as a service or operator gets the device's, the smaller one.
func TestOfflineQuotaOfRestoredSessionByRole(t *testing.T) {
	b := &Broker{cfg: Config{Queues: Queues{}.withDefaults(), Directory: principals(map[string]identity.Role{"backend": identity.RoleService})}}
	if got := b.queuePolicy(&mqtt.Client{ID: "backend"}).MaxOffline; got != DefaultQueues.Service.MaxOffline {
		t.Errorf("restored service session: quota %d, want %d", got, DefaultQueues.Service.MaxOffline)
	}
	if got := b.queuePolicy(&mqtt.Client{ID: "sensor-1"}).MaxOffline; got != DefaultQueues.Device.MaxOffline {
		t.Errorf("restored device session: quota %d, want %d", got, DefaultQueues.Device.MaxOffline)
	}
	// A custom policy without a quota gets the default; a negative one none.
	q := Queues{Device: mqtt.QueuePolicy{Size: 8}, Service: mqtt.QueuePolicy{Size: 8, MaxOffline: -1}}.withDefaults()
	if q.Device.MaxOffline != DefaultQueues.Device.MaxOffline || q.Service.MaxOffline != 0 {
		t.Errorf("withDefaults: %+v", q)
	}
	// Only a quota (fleetgate serve --max-queued-*): the default queue with it.
	q = Queues{Device: mqtt.QueuePolicy{MaxOffline: 5}, Service: mqtt.QueuePolicy{MaxOffline: -1}}.withDefaults()
	wantDev, wantSvc := DefaultQueues.Device, DefaultQueues.Service
	wantDev.MaxOffline, wantSvc.MaxOffline = 5, 0
	if q.Device != wantDev || q.Service != wantSvc {
		t.Errorf("withDefaults of quotas only: %+v", q)
	}
}
