package auth

import (
	"strings"

	"github.com/fleetgate/fleetgate/identity"
)

// ClientIDMatches reports whether a client may use clientID with identity
// id: its name, or, for a service, <name>:<suffix> (suffix [a-z0-9-]{1,64})
// for each further connection (replicas, a sender and a listener), so
// that a second connection does not take over the first. The policy
// applies to the identity, whatever the suffix.
func ClientIDMatches(clientID string, id identity.Identity) bool {
	if clientID == id.Name {
		return true
	}
	name, suffix, ok := strings.Cut(clientID, ":")
	return ok && id.Role == identity.RoleService && name == id.Name && identity.ValidateName(suffix) == nil
}

// nameOfClientID is the identity name of a client ID (without a suffix).
func nameOfClientID(clientID string) string {
	name, _, _ := strings.Cut(clientID, ":")
	return name
}
