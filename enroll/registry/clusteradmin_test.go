package registry

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/identity"
)

// race runs fns at once, each on its own goroutine, and returns their
// errors in order.
func race(fns ...func() error) []error {
	errs := make([]error, len(fns))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, fn := range fns {
		wg.Add(1)
		go func() { defer wg.Done(); <-start; errs[i] = fn() }()
	}
	close(start)
	wg.Wait()
	return errs
}

func addAdmin(t *testing.T, r *Registry, name string) {
	t.Helper()
	clusterSerial.Lock()
	clusterSerial.n++
	s := fmt.Sprintf("0a%06x", clusterSerial.n)
	clusterSerial.Unlock()
	if err := r.RecordCertificate(&fleet.Certificate{Serial: s, Role: identity.RoleOperator, Name: name, NotAfter: time.Now().Add(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	if err := r.SetOperatorRole(OperatorRecord{Name: name, Role: OperatorAdmin}); err != nil {
		t.Fatal(err)
	}
}

// The last two admins are removed at once, each through another node:
// exactly one removal succeeds, the other is refused ErrLastAdmin, and
// one admin remains (with its role and a valid certificate).
func TestClusterConcurrentRemovalOfTheLastTwoAdminsOneWins(t *testing.T) {
	for round := range 3 {
		n := clusterNodes(t)
		a, b := fmt.Sprintf("adm-a%d", round), fmt.Sprintf("adm-b%d", round)
		addAdmin(t, n[0], a)
		addAdmin(t, n[1], b)
		errs := race(
			func() error { _, err := n[0].RemoveOperator(a, "test", "op"); return err },
			func() error { _, err := n[1].RemoveOperator(b, "test", "op"); return err },
		)
		ok, last := 0, 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, ErrLastAdmin):
				last++
			default:
				t.Fatalf("round %d: removal: %v", round, err)
			}
		}
		if ok != 1 || last != 1 {
			t.Fatalf("round %d: removals %v: want one success and one ErrLastAdmin", round, errs)
		}
		admins := 0
		for _, name := range []string{a, b} {
			role, err := n[2].OperatorRole(name)
			if err != nil {
				t.Fatal(err)
			}
			cs, err := n[2].PrincipalCertificates(identity.RoleOperator, name)
			if err != nil {
				t.Fatal(err)
			}
			if role == OperatorAdmin && len(cs) == 1 && !cs[0].Revoked {
				admins++
			}
		}
		if admins != 1 {
			t.Fatalf("round %d: %d admins left, want 1", round, admins)
		}
	}
}

// A device ID and an operator name claimed at once through two nodes:
// exactly one is recorded, the other is refused ErrNameTaken.
func TestClusterDeviceIDAndOperatorNameRaceOneWins(t *testing.T) {
	n := clusterNodes(t)
	for i := range 5 {
		name := fmt.Sprintf("shared-name-%d", i)
		errs := race(
			func() error {
				return n[0].RecordCertificate(&fleet.Certificate{Serial: fmt.Sprintf("0b%04x", i), Role: identity.RoleOperator, Name: name, NotAfter: time.Now().Add(time.Hour)})
			},
			func() error {
				return n[1].RegisterEK(EKRegistration{Fingerprint: fmt.Sprintf("%064x", i+1), DeviceID: name}, "op")
			},
		)
		ok, taken := 0, 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case errors.Is(err, ErrNameTaken):
				taken++
			default:
				t.Fatalf("%s: %v", name, err)
			}
		}
		if ok != 1 || taken != 1 {
			t.Fatalf("%s: %v: want one recorded and one ErrNameTaken", name, errs)
		}
		// The records agree with the winner, through the third node.
		_, devErr := n[2].Device(name)
		ops, err := n[2].PrincipalCertificates(identity.RoleOperator, name)
		if err != nil {
			t.Fatal(err)
		}
		if (devErr == nil) == (len(ops) > 0) {
			t.Fatalf("%s: device %v, operator certificates %d: want exactly one of them", name, devErr, len(ops))
		}
	}
}
