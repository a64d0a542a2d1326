package sim

import (
	"reflect"
	"testing"
	"time"
)

// The chaos schedule: a seed gives the same schedule; node faults never
// overlap (one at a time, every node back a second before the next), an
// all-down comes at most once per allDownEvery, revocations and
// suspensions touch distinct devices (each at most a tenth of the fleet),
// and a 10-minute schedule holds every kind of event.
func TestChaosSchedule(t *testing.T) {
	const d, nodes, devices = 10 * time.Minute, 3, 30
	for seed := int64(1); seed <= 20; seed++ {
		s := chaosSchedule(seed, d, nodes, devices)
		if !reflect.DeepEqual(s, chaosSchedule(seed, d, nodes, devices)) {
			t.Fatalf("seed %d: two schedules differ", seed)
		}
		kinds := map[string]int{}
		var busyUntil, lastAllDown time.Duration = 0, -allDownEvery
		revoked, suspended := map[int]bool{}, map[int]bool{}
		for _, e := range s {
			kinds[e.Action]++
			switch e.Action {
			case chaosKill, chaosPause, chaosPartition, chaosAllDown:
				if e.At < busyUntil {
					t.Fatalf("seed %d: %s starts before the fault before it ended (%s)", seed, e, busyUntil)
				}
				busyUntil = e.At + e.Hold + time.Second
				if e.Action == chaosAllDown {
					if e.At-lastAllDown < allDownEvery {
						t.Fatalf("seed %d: %s within %s of the one before", seed, e, allDownEvery)
					}
					lastAllDown = e.At
				}
			case chaosRevoke:
				revoked[e.Device] = true
			case chaosSuspend:
				suspended[e.Device] = true
			}
		}
		for id := range suspended {
			if revoked[id] {
				t.Fatalf("seed %d: device #%d both revoked and suspended", seed, id+1)
			}
		}
		if len(revoked) > devices/10 || len(suspended) > devices/10 {
			t.Fatalf("seed %d: %d revoked, %d suspended, of %d", seed, len(revoked), len(suspended), devices)
		}
		if seed == 1 {
			for _, k := range []string{chaosKill, chaosPause, chaosPartition, chaosAllDown, chaosRevoke, chaosSuspend, chaosToken} {
				if kinds[k] == 0 {
					t.Errorf("seed 1, %s: no %s event: %v", d, k, kinds)
				}
			}
		}
		short := map[string]int{}
		for _, e := range chaosSchedule(seed, 2*time.Minute, nodes, devices) {
			short[e.Action]++
		}
		t.Logf("seed %2d: 10m %v; 2m %v", seed, kinds, short)
	}
}
