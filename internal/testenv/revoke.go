package testenv

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/operator/client"
)

// Revokee is a connected device whose client reports, on Lost, when its
// connection was closed.
type Revokee struct {
	ID   string
	Lost <-chan time.Time
}

// MeasureRevocations revokes each device through admin, one by one, and
// reports on b the time from the revoke call returning (0 if the session
// was closed before it returned) and from the call starting to the client
// seeing its connection closed: p50 and p99 in ms.
func MeasureRevocations(b *testing.B, admin *client.Client, devs []Revokee) {
	b.Helper()
	ctx := context.Background()
	var afterReturn, fromStart []time.Duration
	b.ResetTimer()
	for _, d := range devs {
		t0 := time.Now()
		if _, err := admin.DeviceAction(ctx, d.ID, "revoke", "bench"); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		select {
		case at := <-d.Lost:
			afterReturn = append(afterReturn, max(0, at.Sub(t1)))
			fromStart = append(fromStart, at.Sub(t0))
		case <-time.After(10 * time.Second):
			b.Fatalf("%s not disconnected within 10s of its revocation", d.ID)
		}
	}
	b.StopTimer()
	b.ReportMetric(percentileMS(afterReturn, 50), "p50-ms-after-return")
	b.ReportMetric(percentileMS(afterReturn, 99), "p99-ms-after-return")
	b.ReportMetric(percentileMS(fromStart, 50), "p50-ms-from-call")
	b.ReportMetric(percentileMS(fromStart, 99), "p99-ms-from-call")
	b.ReportMetric(float64(len(devs)), "devices")
}

func percentileMS(ds []time.Duration, p int) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return float64(s[min(len(s)-1, len(s)*p/100)].Microseconds()) / 1000
}
