package devicesdk_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// fakeClock fires every After at once and records what was asked.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	waits []time.Duration
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	c.waits = append(c.waits, d)
	c.now = c.now.Add(d)
	c.mu.Unlock()
	ch := make(chan time.Time, 1)
	ch <- c.now
	return ch
}

func TestAutoRenewAtTwoThirdsWithJitter(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 3 * time.Hour})
	d := g.EnrollDevice(t, "renewer", "lab")
	first := d.Leaf()
	clock := &fakeClock{now: time.Now()}
	ctx, cancel := context.WithCancel(context.Background())
	renewed := make(chan struct{}, 1)
	errc := make(chan error, 1)
	go func() {
		errc <- d.AutoRenew(ctx, devicesdk.RenewOptions{Clock: clock, IssuerCheck: -1, OnRenewed: func() {
			select {
			case renewed <- struct{}{}:
			default:
			}
		}})
	}()
	select {
	case <-renewed:
	case err := <-errc:
		t.Fatalf("AutoRenew ended: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("no renewal")
	}
	cancel()
	<-errc
	if d.Leaf().SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("certificate not replaced")
	}
	clock.mu.Lock()
	w := clock.waits[0]
	clock.mu.Unlock()
	life := first.NotAfter.Sub(first.NotBefore)
	elapsed := time.Since(first.NotBefore)
	hi := time.Duration(float64(life)*2/3) - elapsed + time.Second
	lo := time.Duration(float64(life)*(2.0/3-0.05)) - elapsed - time.Minute
	if w < lo || w > hi {
		t.Fatalf("first renewal scheduled in %s, want between %s and %s (2/3 of %s with 5%% jitter)", w, lo, hi, life)
	}
}

func TestNextRenewalSpreadsAFleet(t *testing.T) {
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 90 * 24 * time.Hour})
	d := g.EnrollDevice(t, "spread", "lab")
	seen := map[time.Time]bool{}
	for range 20 {
		seen[d.NextRenewal(devicesdk.RenewOptions{})] = true
	}
	if len(seen) < 10 {
		t.Fatalf("jitter produced only %d distinct renewal times of 20", len(seen))
	}
}
