package enroll_test

import (
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// dirBytes is the apparent size of the files under dir.
func dirBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err == nil {
			n += fi.Size()
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// hostileBody is a token enrollment whose only field is an unknown one
// with a 64 KiB name: the decoder's error quotes it.
func hostileBody() []byte {
	name := strings.Repeat("A", api.MaxBodyBytes-16)
	return []byte(`{"` + name + `":1}`)
}

// floodGrowth starts a gateway, sends n hostile token enrollments from one
// client (n = 0: none), stops it and returns the size of the registry
// directory before and after the stop (badger compacts and compresses at
// Close), of the log, and the gateway (stopped).
func floodGrowth(t *testing.T, n int) (registryLive, registryBytes, logBytes int64, g *testenv.Gateway) {
	t.Helper()
	g = testenv.Start(t, testenv.Options{})
	c := client(g, nil)
	body := hostileBody()
	for i := range n {
		resp, err := c.Post(g.URL()+api.PathEnrollToken, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("request %d: %d", i, resp.StatusCode)
		}
	}
	live := dirBytes(t, filepath.Join(g.DataDir, "registry"))
	g.Stop() // writes the open summaries, closes the registry
	return live, dirBytes(t, filepath.Join(g.DataDir, "registry")), int64(len(g.Logs.String())), g
}

// TestRefusalFloodBoundsDiskAndLog: an unauthenticated client sending
// token enrollments with a 64 KiB unknown JSON field name grows the
// registry and the log by a bounded number of bytes per request; the first
// refusals are audited and logged in full (bounded), the rest summarised in
// one audit record and one log line.
//
// FLEETGATE_FLOOD_N=10000 measures the figures in docs/operations.md.
func TestRefusalFloodBoundsDiskAndLog(t *testing.T) {
	n := 300
	if v, err := strconv.Atoi(os.Getenv("FLEETGATE_FLOOD_N")); err == nil && v > 0 {
		n = v
	}
	live0, reg0, log0, _ := floodGrowth(t, 0)
	live1, reg1, log1, g := floodGrowth(t, n)
	perReq := float64(max(reg1-reg0, live1-live0)+(log1-log0)) / float64(n)
	t.Logf("%d hostile requests: registry while running +%d bytes, after close +%d bytes, log +%d bytes: %.1f bytes per request",
		n, live1-live0, reg1-reg0, log1-log0, perReq)
	// Each request sends 64 KiB; today's bound is a few records and lines
	// in total, so well under 100 bytes per request at n = 300 (and less
	// as n grows).
	if perReq > 100 {
		t.Fatalf("%.0f bytes of registry and log per hostile request", perReq)
	}

	// In full: a few refusals per window (5 per source and code); the rest
	// in one summary per window. Counted, not timed: however many windows
	// the flood spans, every refusal is either in full or in a summary.
	logs := g.Logs.String()
	fullLines := strings.Count(logs, `msg="request refused"`)
	suppressedLines, summaryLines := 0, 0
	for _, m := range regexp.MustCompile(`msg="refusals suppressed" (?:\S+ )*?source=127\.0\.0\.1 suppressed=(\d+) codes="malformed_json ×(\d+)"`).FindAllStringSubmatch(logs, -1) {
		k, _ := strconv.Atoi(m[1])
		if m[2] != m[1] {
			t.Errorf("summary line of %s refusals counts %s malformed_json", m[1], m[2])
		}
		suppressedLines += k
		summaryLines++
	}
	if fullLines+suppressedLines != n || summaryLines < 1 || fullLines > 5*(summaryLines+1) {
		t.Errorf("log: %d refusals in full, %d in %d summaries, for %d refusals", fullLines, suppressedLines, summaryLines, n)
	}
	for _, line := range strings.Split(logs, "\n") {
		if len(line) > 2048 {
			t.Errorf("log line of %d bytes: %.120s", len(line), line)
		}
	}

	reg, err := registry.Open(filepath.Join(g.DataDir, "registry"), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	recs, err := reg.AuditLog("", 0)
	if err != nil {
		t.Fatal(err)
	}
	full, suppressed, summaries := 0, 0, 0
	for _, a := range recs {
		if len(a.Reason)+len(a.Action)+len(a.Actor)+len(a.Remote) > 2048 {
			t.Errorf("audit record of %d bytes: %.120s", len(a.Reason), a.Reason)
		}
		switch {
		case a.Action == "enroll.token" && a.Outcome == registry.OutcomeDenied:
			full++
		case a.Action == "refusals.suppressed":
			var k, kc int
			var window string
			if _, err := fmt.Sscanf(a.Reason, "%d more refusals from 127.0.0.1 in the last %s malformed_json ×%d", &k, &window, &kc); err != nil || k != kc {
				t.Errorf("summary %q: %v", a.Reason, err)
			}
			suppressed += k
			summaries++
		}
	}
	if full+suppressed != n || summaries != summaryLines || full != fullLines {
		t.Errorf("audit: %d refusals in full, %d in %d summaries, for %d refusals (log: %d, %d)", full, suppressed, summaries, n, fullLines, summaryLines)
	}
}
