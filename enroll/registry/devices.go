package registry

import (
	"sort"

	"github.com/fleetgate/fleetgate/fleet"
)

// Device returns the record of id.
func (r *Registry) Device(id string) (*fleet.Device, error) {
	var d fleet.Device
	if err := r.view(func(txn txn) error { return get(txn, pfxDevice+id, &d) }); err != nil {
		return nil, err
	}
	return &d, nil
}

// Devices lists all devices, sorted by ID.
func (r *Registry) Devices() ([]fleet.Device, error) {
	var out []fleet.Device
	err := r.view(func(txn txn) error {
		return iterate(txn, pfxDevice, func(d *fleet.Device) error { out = append(out, *d); return nil })
	})
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, err
}
