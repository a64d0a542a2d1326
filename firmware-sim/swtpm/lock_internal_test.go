package swtpm

import (
	"path/filepath"
	"testing"
)

func TestStateLockIsSeenWhileSwtpmRuns(t *testing.T) {
	SkipIfNotInstalled(t)
	inst := StartForTest(t, ManufacturerForTest(t))
	lock := filepath.Join(inst.Dir(), "state", ".lock")
	free, err := lockFree(lock)
	if err != nil {
		t.Fatalf("lockFree: %v", err)
	}
	if free {
		t.Fatal("state lock reported free while swtpm runs")
	}
	if err := inst.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if free, err = lockFree(lock); err != nil || !free {
		t.Fatalf("state lock after Stop: free=%t err=%v", free, err)
	}
}
