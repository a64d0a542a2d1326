package directory

import "github.com/fleetgate/fleetgate/fleet"

// DeviceCount is how many devices are in one state with one attestation
// method.
type DeviceCount struct {
	State  fleet.DeviceState
	Method string
	N      int
}

// DeviceCounts counts the devices of the view by state and attestation
// method (the fleetgate_devices gauge).
func (d *Directory) DeviceCounts() []DeviceCount {
	type key struct {
		state  fleet.DeviceState
		method string
	}
	m := map[key]int{}
	d.mu.RLock()
	for _, ds := range d.devices {
		m[key{ds.State, ds.Method}]++
	}
	d.mu.RUnlock()
	out := make([]DeviceCount, 0, len(m))
	for k, n := range m {
		out = append(out, DeviceCount{State: k.state, Method: k.method, N: n})
	}
	return out
}
