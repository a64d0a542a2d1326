package server

import "testing"

func TestTrimmerTrimsOnceAfterBurst(t *testing.T) {
	var tr trimmer
	total := uint64(1 << 30)
	step := func(d uint64) bool { total += d; return tr.observe(total) }
	if tr.observe(total) {
		t.Fatal("trimmed at the first sample")
	}
	// Steady traffic: allocating every tick, never quiet.
	for i := 0; i < 100; i++ {
		if step(trimQuiet * 2) {
			t.Fatalf("trimmed while allocating (tick %d)", i)
		}
	}
	// Quiet after that burst: one trim, then none while quiet.
	if !step(0) {
		t.Fatal("no trim after a burst followed by a quiet tick")
	}
	for i := 0; i < 10; i++ {
		if step(trimQuiet / 2) {
			t.Fatal("trimmed again without a new burst")
		}
	}
	// Small bursts below trimBurst do not trim.
	if step(trimQuiet*2) || step(0) {
		t.Fatal("trimmed after a burst smaller than trimBurst")
	}
	// A steady light load (just under trimQuiet a tick) never trims, however
	// long it lasts.
	for i := 0; i < 1000; i++ {
		if step(trimQuiet - 1) {
			t.Fatalf("trimmed under a steady light load (tick %d)", i)
		}
	}
}
