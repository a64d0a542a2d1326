package devicesdk

import (
	"context"
	"crypto/x509"
	"math/rand/v2"
	"time"
)

// Clock is the time source of the renewal loop; tests inject one.
type Clock interface {
	Now() time.Time
	// After returns a channel that fires after d.
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// RenewOptions tune AutoRenew.
type RenewOptions struct {
	// Clock defaults to the real clock.
	Clock Clock
	// Fraction of the lifetime after which to renew (default 2/3).
	Fraction float64
	// Jitter is the fraction of the lifetime by which the renewal time is
	// randomly moved earlier, so a fleet enrolled together does not renew
	// together (default 0.05).
	Jitter float64
	// Retry is the pause after a failed attempt (default 1 minute, capped
	// to a tenth of the remaining lifetime).
	Retry time.Duration
	// OnRenewed is called after each successful renewal (e.g. to reconnect
	// and move the MQTT session onto the new certificate).
	OnRenewed func()
	// OnError is called after each failed attempt.
	OnError func(error)
	// IssuerCheck is how often AutoRenew asks the server whether the
	// certificate's issuing CA is still the current one (default 1 hour;
	// negative: never). It also asks once at the start: a device back after
	// a long time offline learns of a rotation at once.
	IssuerCheck time.Duration
	// EarlyJitter spreads the early renewal after a rotation: it happens
	// at a random time within EarlyJitter of the check that saw it
	// (default 1 hour), so that a fleet does not renew in one minute.
	EarlyJitter time.Duration
	// OnIssuerChanged is called when a check finds that the issuing CA is
	// no longer the current one, with the time of the early renewal.
	OnIssuerChanged func(at time.Time)
}

// NextRenewal returns when the current certificate should be renewed.
func (d *Device) NextRenewal(o RenewOptions) time.Time {
	o = o.withDefaults()
	leaf := d.Leaf()
	if leaf == nil {
		return o.Clock.Now()
	}
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	at := leaf.NotBefore.Add(time.Duration(float64(life) * o.Fraction))
	if o.Jitter > 0 {
		at = at.Add(-time.Duration(rand.Float64() * o.Jitter * float64(life)))
	}
	return at
}

func (o RenewOptions) withDefaults() RenewOptions {
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	if o.Fraction <= 0 || o.Fraction >= 1 {
		o.Fraction = 2.0 / 3
	}
	if o.Jitter < 0 || o.Jitter >= o.Fraction {
		o.Jitter = 0
	} else if o.Jitter == 0 {
		o.Jitter = 0.05
	}
	if o.Retry <= 0 {
		o.Retry = time.Minute
	}
	if o.IssuerCheck == 0 {
		o.IssuerCheck = time.Hour
	}
	if o.EarlyJitter <= 0 {
		o.EarlyJitter = time.Hour
	}
	return o
}

// AutoRenew renews the certificate at about 2/3 of its lifetime, with
// jitter, until ctx ends; and early, within EarlyJitter, once the server
// says the certificate's issuing CA is no longer the current one (an
// issuing-CA rotation: IssuerCheck). Failed attempts are retried.
func (d *Device) AutoRenew(ctx context.Context, o RenewOptions) error {
	o = o.withDefaults()
	var (
		leaf      *x509.Certificate
		at        time.Time // the renewal of leaf
		early     time.Time // zero: none
		nextCheck = o.Clock.Now()
	)
	for {
		if l := d.Leaf(); l != leaf || leaf == nil {
			leaf, at, early = l, d.NextRenewal(o), time.Time{}
		}
		due := at
		if !early.IsZero() && early.Before(due) {
			due = early
		}
		now := o.Clock.Now()
		if wait := due.Sub(now); wait > 0 {
			check := o.IssuerCheck > 0 && early.IsZero() && leaf != nil
			if check && !nextCheck.After(now) {
				nextCheck = now.Add(o.IssuerCheck)
				if cur, err := d.IssuerCurrent(ctx); err == nil && !cur {
					early = now.Add(time.Duration(rand.Int64N(int64(o.EarlyJitter))))
					if o.OnIssuerChanged != nil {
						o.OnIssuerChanged(early)
					}
				}
				continue
			}
			if check && nextCheck.Sub(now) < wait {
				wait = nextCheck.Sub(now)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-o.Clock.After(wait):
			}
			continue
		}
		if err := d.Renew(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if o.OnError != nil {
				o.OnError(err)
			}
			retry := o.Retry
			if leaf := d.Leaf(); leaf != nil {
				if left := leaf.NotAfter.Sub(o.Clock.Now()) / 10; left > time.Second && left < retry {
					retry = left
				}
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-o.Clock.After(retry):
			}
			continue
		}
		if o.OnRenewed != nil {
			o.OnRenewed()
		}
	}
}
