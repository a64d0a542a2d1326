package registry

import (
	"errors"
	"strings"

	badger "github.com/dgraph-io/badger/v4"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// Devices of other nodes (Options.Shared). A device another node enrolled
// is not in this node's badger, but the cluster's directory knows it. Its
// revocation, suspension or resumption through this node is written into
// the directory: the cluster's feed publishes it to the shared bucket
// before the call returns (cluster/dirfeed), this node's broker closes its
// sessions, and the node that holds the device's records applies it to
// them when the bucket delivers it (ApplyClusterState).

// remoteDevice reports whether id is a device only the cluster knows.
func (r *Registry) remoteDevice(id string) bool {
	if r.shared == nil {
		return false
	}
	if _, ok := r.dir.DeviceStatus(id); !ok {
		return false
	}
	err := r.db.View(func(txn *badger.Txn) error {
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

// ApplyClusterState brings this node's record of device id to the state
// the cluster's bucket holds (a change made through another node): a
// revocation, a suspension or a resumption. Devices this node does not
// hold are ignored.
func (r *Registry) ApplyClusterState(id string, state fleet.DeviceState) error {
	var d fleet.Device
	if err := r.db.View(func(txn *badger.Txn) error { return get(txn, pfxDevice+id, &d) }); err != nil {
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
