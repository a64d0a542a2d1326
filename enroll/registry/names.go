package registry

import (
	"errors"
	"fmt"

	"github.com/fleetgate/fleetgate/identity"
)

// Device IDs and service/operator names share one namespace (they are
// MQTT client IDs), checked in the transaction that claims a name, so
// that it holds across cluster nodes, not only in a node's directory:
//
//	principal/<name>   {"role":"service"|"operator"}, written with the
//	                   name's first certificate
//
// Recording a principal's certificate reads the device record of its name
// (absent) and guards it; creating or changing a device reads the
// principal record of its ID and writes the device record at the revision
// it read. Of two such transactions on any nodes, the second conflicts,
// runs its check again and finds the name taken. Principals recorded
// before this record existed are still checked through the directory.

const pfxPrincipal = "principal/"

type principalRecord struct {
	Role identity.Role `json:"role"`
}

// deviceNameFree refuses id if a service or operator holds the name. The
// device's record is read first (the transaction writes it at that
// revision): a principal claimed after that read guards the device's
// key, so the commit conflicts; one claimed before, this read sees.
func deviceNameFree(txn txn, id string) error {
	if _, err := txn.getRaw(pfxDevice + id); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if taken, err := exists(txn, pfxPrincipal+id); err != nil {
		return err
	} else if taken {
		return fmt.Errorf("%w: %q is a service or operator name", ErrNameTaken, id)
	}
	return nil
}

// claimPrincipalName refuses name if a device holds it, and records it
// as role's.
func claimPrincipalName(txn txn, name string, role identity.Role) error {
	if taken, err := exists(txn, pfxDevice+name); err != nil {
		return err
	} else if taken {
		return fmt.Errorf("%w: %q is a device ID", ErrNameTaken, name)
	}
	txn.guard(pfxDevice + name)
	var rec principalRecord
	if err := get(txn, pfxPrincipal+name, &rec); err == nil && rec.Role == role {
		return nil
	}
	return put(txn, pfxPrincipal+name, &principalRecord{Role: role})
}
