package devicesdk_test

import (
	"context"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// After an issuing-CA rotation a device renews early, within EarlyJitter
// of noticing, long before 2/3 of its lifetime, onto the new CA.
func TestAutoRenewEarlyAfterRotation(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 90 * 24 * time.Hour})
	d := g.EnrollDevice(t, "early", "lab")
	ctx := context.Background()
	if cur, err := d.IssuerCurrent(ctx); err != nil || !cur {
		t.Fatalf("before the rotation: current %t, %v", cur, err)
	}
	r, err := g.Admin.CARotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cur, err := d.IssuerCurrent(ctx); err != nil || cur {
		t.Fatalf("after the rotation: current %t, %v", cur, err)
	}
	clock := &fakeClock{now: time.Now()}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	renewed := make(chan struct{}, 1)
	var early time.Time
	errc := make(chan error, 1)
	const jitter = 10 * time.Minute
	go func() {
		errc <- d.AutoRenew(ctx, devicesdk.RenewOptions{Clock: clock, EarlyJitter: jitter,
			OnIssuerChanged: func(at time.Time) { early = at },
			OnRenewed: func() {
				select {
				case renewed <- struct{}{}:
				default:
				}
			}})
	}()
	start := clock.Now()
	select {
	case <-renewed:
	case err := <-errc:
		t.Fatalf("AutoRenew ended: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no early renewal")
	}
	cancel()
	<-errc
	if early.IsZero() || early.Sub(start) >= jitter {
		t.Fatalf("early renewal scheduled at +%s (jitter %s)", early.Sub(start), jitter)
	}
	if cur, err := d.IssuerCurrent(context.Background()); err != nil || !cur {
		t.Fatalf("after the early renewal: current %t, %v", cur, err)
	}
	a, err := ca.Load(g.DataDir, ca.Options{}) // the CA as the server now has it
	if err != nil {
		t.Fatal(err)
	}
	if got := a.IssuerOf(d.Leaf()); got == nil || got.ID != r.Issuer.ID {
		t.Fatalf("renewed certificate not from the new issuing CA %s", r.Issuer.ID)
	}
}
