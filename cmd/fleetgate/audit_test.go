package main

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// auditRows returns the SEQ and DEVICE columns of `fleetgate audit` output.
func auditRows(t *testing.T, out string) (seqs []int, devices []string) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "SEQ") {
		t.Fatalf("no header: %q", out)
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		n, err := strconv.Atoi(f[0])
		if err != nil {
			t.Fatalf("row %q", l)
		}
		seqs = append(seqs, n)
		if f[3] == "token.create" {
			devices = append(devices, f[4])
		}
	}
	return seqs, devices
}

// TestAuditCommandPages: `fleetgate audit --limit 5` shows the newest five,
// newest first, and prints how to get the next page; following it shows
// the five before; --device shows only that device.
func TestAuditCommandPages(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	for i := range 12 {
		g.Token(t, fmt.Sprintf("dev-%d", i%3), "lab", time.Hour)
	}
	out, errOut, err := runCLI(t, g, "audit", "--limit", "5")
	if err != nil {
		t.Fatal(err)
	}
	seqs, devs := auditRows(t, out)
	if len(seqs) != 5 || devs[0] != "dev-2" {
		t.Fatalf("first page: %v %v\n%s", seqs, devs, out)
	}
	for i := 1; i < len(seqs); i++ {
		if seqs[i] >= seqs[i-1] {
			t.Fatalf("not newest first: %v", seqs)
		}
	}
	m := regexp.MustCompile(`--cursor (\S+)`).FindStringSubmatch(errOut)
	if m == nil {
		t.Fatalf("no next-page hint: %q", errOut)
	}
	out, _, err = runCLI(t, g, "audit", "--limit", "5", "--cursor", m[1])
	if err != nil {
		t.Fatal(err)
	}
	next, _ := auditRows(t, out)
	if len(next) != 5 || next[0] >= seqs[4] {
		t.Fatalf("second page %v after %v", next, seqs)
	}
	out, _, err = runCLI(t, g, "audit", "--device", "dev-1", "--all")
	if err != nil {
		t.Fatal(err)
	}
	_, devs = auditRows(t, out)
	if len(devs) != 4 {
		t.Fatalf("dev-1: %v\n%s", devs, out)
	}
	for _, d := range devs {
		if d != "dev-1" {
			t.Fatalf("--device dev-1 shows %s", d)
		}
	}
}
