package acl

import (
	"fmt"
	"slices"

	"github.com/fleetgate/fleetgate/identity"
)

// A rule's names: selector scopes it to some identities by name, e.g. one
// backend service to part of the fleet:
//
//	- name: billing-reads-lab
//	  roles: [service]
//	  names: [billing]
//	  allow: [subscribe]
//	  topics: ["groups/lab/#"]

// appliesToName: the rule has no names: or lists name.
func (c *compiled) appliesToName(name string) bool {
	return len(c.Names) == 0 || slices.Contains(c.Names, name)
}

func checkNames(names []string) []error {
	var errs []error
	for _, n := range names {
		if err := identity.ValidateName(n); err != nil {
			errs = append(errs, fmt.Errorf("name %q: %w", n, err))
		}
	}
	return errs
}
