package fleetproc

import (
	"context"
	"path/filepath"
	"strings"
	"time"
)

// TB is the part of testing.TB that ForTest uses (this package does not
// import testing: shipped commands link it).
type TB interface {
	Helper()
	Cleanup(func())
	TempDir() string
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
	Failed() bool
}

// ForTest starts `fleetgate serve` as o says (the address file in a test
// temp dir, the log kept in memory unless o.Log is set), fails the test if
// it does not come up, and stops exactly this process when the test ends,
// also when it fails. A process that does not stop cleanly on SIGTERM
// fails the test.
func ForTest(t TB, o Options) *Proc {
	t.Helper()
	if o.AddrFile == "" {
		o.AddrFile = filepath.Join(t.TempDir(), "addrs.json")
	}
	p, err := Start(context.Background(), o)
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(func() {
		StopForTest(t, p)
		if t.Failed() {
			t.Logf("fleetgate serve (pid %d, %s), its last warnings and errors:\n%s", p.PID, o.DataDir, Warnings(p.Log(), 60))
		}
	})
	return p
}

// Warnings returns the last n lines of log at WARN or ERROR (what a failed
// test prints of each process it started).
func Warnings(log string, n int) string {
	var keep []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep[max(0, len(keep)-n):], "\n")
}

// StopForTest stops p (SIGTERM, SIGKILL after 30 s) and fails the test if
// it did not exit cleanly. Calling it again, or at cleanup, does nothing.
// 30 s, not 10: a cluster node whose peers were stopped before it has lost
// its JetStream quorum, and its shutdown's last writes wait out their
// acknowledgement timeouts (seen once at 10 s; docs/cluster.md, not
// built yet).
func StopForTest(t TB, p *Proc) {
	t.Helper()
	if err := p.Stop(30 * time.Second); err != nil {
		t.Errorf("fleetgate serve (pid %d): %v", p.PID, err)
	}
}
