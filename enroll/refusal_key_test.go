package enroll

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/registry"
)

func TestRefusalKeyGroupsIPv6By64(t *testing.T) {
	key := func(remote string) string { return refusalSource(&http.Request{RemoteAddr: remote}) }
	if a, b := key("[2001:db8:1:2::1]:443"), key("[2001:db8:1:2:ffff::9]:1"); a != b || a != "2001:db8:1:2::/64" {
		t.Fatalf("one /64, two keys: %q %q", a, b)
	}
	if a, b := key("[2001:db8:1:3::1]:443"), key("[2001:db8:1:2::1]:443"); a == b {
		t.Fatal("two /64s share a key")
	}
	if k := key("192.0.2.7:5000"); k != "192.0.2.7" {
		t.Fatalf("IPv4 key %q", k)
	}
}

// TestRefusalsFromManySourcesAreGloballyBounded: M2. Refusals of two codes
// from 5,000 distinct source addresses (RemoteAddr; X-Forwarded-For is not
// trusted) go through the server's refusal path (metrics, audit, log) with
// a real registry. The refusals audited and logged in full stay within the
// global budget (at most 2×RefusalGlobal in the window) whatever the
// number of sources; every refusal is in full or in a summary; the
// summaries are bounded (RefusalSummaries + one aggregate) and each names
// its source with a count per code.
func TestRefusalsFromManySourcesAreGloballyBounded(t *testing.T) {
	dir := t.TempDir()
	res, err := ca.Init(filepath.Join(dir, "ca"), ca.InitOptions{TrustDomain: "fleet.test", Hosts: []string{"localhost"}})
	if err != nil {
		t.Fatal(err)
	}
	reg, err := registry.Open(filepath.Join(dir, "registry"), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	var logs bytes.Buffer
	const global, budget, sources = 40, 50, 5000
	s, err := New(Config{CA: res.Authority, Registry: reg, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		RefusalGlobal: global, RefusalSummaries: budget})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for i := range sources {
		for _, body := range []string{"{", `{"token":"nope","csr":"AAAA"}`, "{"} {
			r := httptest.NewRequest(http.MethodPost, "/enroll/token", strings.NewReader(body))
			r.Header.Set("Content-Type", "application/json")
			r.RemoteAddr = fmt.Sprintf("10.%d.%d.%d:4000", i>>16, (i>>8)&0xff, i&0xff)
			r.Header.Set("X-Forwarded-For", "192.0.2.1") // not trusted
			w := httptest.NewRecorder()
			s.handleTokenEnroll(w, r)
			if w.Code < 400 {
				t.Fatalf("request accepted: %d", w.Code)
			}
			n++
		}
	}
	s.FlushRefusals()
	if err := reg.Close(); err != nil {
		t.Fatal(err)
	}
	reg, err = registry.Open(filepath.Join(dir, "registry"), registry.Options{})
	if err != nil {
		t.Fatal(err)
	}
	recs, err := reg.AuditLog("", 0)
	if err != nil {
		t.Fatal(err)
	}
	full, summarised, summaries, aggregates, overflow := 0, 0, 0, 0, 0
	codes := map[string]int{}
	perCode := regexp.MustCompile(`([a-z_]+) ×(\d+)`)
	for _, a := range recs {
		switch a.Action {
		case "enroll.token":
			full++
		case "refusals.suppressed":
			summaries++
			var k int
			var src string
			if _, err := fmt.Sscanf(a.Reason, "%d more refusals from %s", &k, &src); err != nil {
				t.Fatalf("summary %q: %v", a.Reason, err)
			}
			switch {
			case strings.Contains(a.Reason, "beyond the tracked sources"):
				// The overflow key's own summary (5,000 sources, 4,096
				// tracked): within the budget or merged into the aggregate,
				// as the map's order falls (it was counted as a second
				// aggregate, about one run in eighty).
				overflow++
			case strings.Contains(a.Reason, "other sources"):
				aggregates++
			case src != a.Remote || !strings.HasPrefix(src, "10."):
				t.Fatalf("summary %q names no source (remote %q)", a.Reason, a.Remote)
			}
			_, list, _ := strings.Cut(a.Reason, "1m0s: ")
			sum := 0
			for _, m := range perCode.FindAllStringSubmatch(list, -1) {
				c, _ := strconv.Atoi(m[2])
				codes[m[1]] += c
				sum += c
			}
			if sum != k {
				t.Fatalf("summary %q: per-code counts sum to %d", a.Reason, sum)
			}
			summarised += k
		}
	}
	t.Logf("%d refusals: %d in full, %d summarised in %d summaries (%d aggregates), codes %v", n, full, summarised, summaries, aggregates, codes)
	if full > 2*global {
		t.Errorf("%d refusals in full from %d sources; global budget %d", full, sources, global)
	}
	if full+summarised != n {
		t.Errorf("%d in full + %d summarised != %d refusals", full, summarised, n)
	}
	if summaries > budget*2+1 || aggregates != 1 || overflow > 1 {
		t.Errorf("%d summaries (%d aggregates, %d of the overflow key); budget %d", summaries, aggregates, overflow, budget)
	}
	if len(codes) != 2 {
		t.Errorf("codes in the summaries: %v", codes)
	}
	if c := strings.Count(logs.String(), `msg="request refused"`); c != full {
		t.Errorf("%d full log lines, %d full audit records", c, full)
	}
}
