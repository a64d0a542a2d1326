package registry

import (
	"errors"
	"strings"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Devices the cluster's directory knows but the registry's records do not
// (Options.Shared): a device a node enrolled before the registry's records
// were shared and has not copied into the shared store yet (SeedShared).
// Its revocation, suspension or resumption through this node is written
// into the directory: the cluster's feed publishes it to the shared bucket
// before the call returns (cluster/dirfeed), this node's broker closes its
// sessions, and the node that holds the device's records applies it to
// them when the bucket delivers it (ApplyClusterState).

// remoteDevice reports whether id is a device only the cluster knows.
func (r *Registry) remoteDevice(id string) bool {
	if r.kv == nil {
		return false
	}
	if _, ok := r.dir.DeviceStatus(id); !ok {
		return false
	}
	err := r.view(func(txn txn) error {
		var d fleet.Device
		return get(txn, pfxDevice+id, &d)
	})
	return errors.Is(err, ErrNotFound)
}

// revokeRemote revokes a device of another node in the cluster's view.
func (r *Registry) revokeRemote(id, reason, actor string) []string {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	st, _ := r.dir.DeviceStatus(id)
	var serials []string
	if st.State != fleet.StateRevoked {
		r.dir.DeviceChanged(&fleet.Device{ID: id, Group: st.Group, Tags: st.Tags, State: fleet.StateRevoked})
	}
	_, _, certs, _ := r.dir.Snapshot()
	for s, c := range certs {
		if c.Identity.Role == identity.RoleDevice && c.Identity.Name == id && !c.Revoked {
			serials = append(serials, s)
		}
	}
	if len(serials) > 0 {
		r.dir.Revoked(id, serials...)
	}
	r.Audit(AuditRecord{Actor: actor, Action: "device.revoke", DeviceID: id, Outcome: OutcomeOK,
		Reason: joinReason(reason, nil) + " (device of another cluster node)", Serial: strings.Join(serials, ",")})
	return serials
}

// setSuspendedRemote suspends or resumes a device of another node in the
// cluster's view.
func (r *Registry) setSuspendedRemote(id string, suspend bool, reason, actor string) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	action := "device.resume"
	if suspend {
		action = "device.suspend"
	}
	st, _ := r.dir.DeviceStatus(id)
	var err error
	switch {
	case st.State == fleet.StateRevoked:
		err = ErrInvalidTransition
	case suspend && st.State != fleet.StateSuspended:
		r.dir.DeviceChanged(&fleet.Device{ID: id, Group: st.Group, Tags: st.Tags, State: fleet.StateSuspended})
	case !suspend && st.State == fleet.StateSuspended:
		r.dir.DeviceChanged(&fleet.Device{ID: id, Group: st.Group, Tags: st.Tags, State: fleet.StateActive})
	}
	r.Audit(AuditRecord{Actor: actor, Action: action, DeviceID: id, Outcome: outcome(err),
		Reason: joinReason(reason, err) + " (device of another cluster node)"})
	return err
}

// ApplyClusterState brings the registry's record of device id to the
// state the cluster's directory bucket holds, when the change was made in
// the directory only (revokeRemote, setSuspendedRemote): a revocation, a
// suspension or a resumption. Devices the records do not hold are
// ignored. With shared records (Options.Shared) only a revocation is
// applied: it is terminal, so applying it late is right, while the
// records' own suspension or resumption, committed by whichever node
// made it, is newer than a directory change delivered late.
func (r *Registry) ApplyClusterState(id string, state fleet.DeviceState) error {
	if r.kv != nil && state != fleet.StateRevoked {
		return nil
	}
	var d fleet.Device
	if err := r.view(func(txn txn) error { return get(txn, pfxDevice+id, &d) }); err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		return err
	}
	if d.State == state {
		return nil
	}
	switch {
	case state == fleet.StateRevoked:
		_, err := r.RevokeDevice(id, "revoked through another cluster node", "cluster")
		return err
	case state == fleet.StateSuspended && d.State != fleet.StateRevoked:
		return r.SetSuspended(id, true, "suspended through another cluster node", "cluster")
	case state == fleet.StateActive && d.State == fleet.StateSuspended:
		return r.SetSuspended(id, false, "resumed through another cluster node", "cluster")
	}
	return nil
}

// clusterDeviceState refuses a device the cluster's directory knows
// revoked or suspended, though the registry's records may not know it
// (a change made in the directory only).
func (r *Registry) clusterDeviceState(id string) error {
	if r.kv == nil {
		return nil
	}
	switch st, _ := r.dir.DeviceStatus(id); st.State {
	case fleet.StateRevoked:
		return ErrDeviceRevoked
	case fleet.StateSuspended:
		return ErrDeviceSuspended
	}
	return nil
}
