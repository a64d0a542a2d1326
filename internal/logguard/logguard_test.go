package logguard

import (
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

func TestClip(t *testing.T) {
	long := strings.Repeat("A", 64<<10)
	got := Clip(long, 100)
	if len(got) > 100+len("…(cut)") || !strings.HasSuffix(got, "…(cut)") {
		t.Fatalf("64 KiB string clipped to %d bytes: %q", len(got), got[:20])
	}
	if got := Clip("abc", 100); got != "abc" {
		t.Fatalf("short string changed: %q", got)
	}
	// control characters and invalid UTF-8 are escaped, so a peer cannot
	// forge log lines
	got = Clip("a\nlevel=ERROR msg=forged\x00\xff", 100)
	if strings.ContainsAny(got, "\n\x00") || !utf8.ValidString(got) {
		t.Fatalf("not escaped: %q", got)
	}
	// cut at a rune boundary
	got = Clip(strings.Repeat("é", 10), 5)
	if !utf8.ValidString(got) {
		t.Fatalf("cut inside a rune: %q", got)
	}
}

func TestBound(t *testing.T) {
	if got := Bound(`group="lab" tags=map[]`, 100); got != `group="lab" tags=map[]` {
		t.Fatalf("a clean short string changed: %q", got)
	}
	got := Bound(strings.Repeat("A", 64<<10), 100)
	if len(got) > 100+len("…(cut)") {
		t.Fatalf("64 KiB string bounded to %d bytes", len(got))
	}
	for _, s := range []string{"a\nb", "a\x00", "\xff", "a\u2028b", "a\x1b[31m"} {
		s, _ = strconvUnquote(s)
		if got := Bound(s, 100); strings.ContainsAny(got, "\n\x00\x1b\u2028") || !utf8.ValidString(got) {
			t.Errorf("Bound(%q) = %q: not escaped", s, got)
		}
	}
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time         { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration)    { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func newClock() *clock                  { return &clock{t: time.Unix(1e9, 0)} }
func (c *clock) opts(o Options) Options { o.Now = c.now; return o }

func TestLimiterBurstAndSummary(t *testing.T) {
	c := newClock()
	var got []string
	var counts []int
	l := New(c.opts(Options{Burst: 3, Window: time.Minute, Summary: func(k string, n int, _ time.Duration) {
		got = append(got, k)
		counts = append(counts, n)
	}}))
	allowed := 0
	for i := 0; i < 1000; i++ {
		if l.Allow("10.0.0.1") {
			allowed++
		}
	}
	if allowed != 3 {
		t.Fatalf("allowed %d of 1000 in one window, want 3", allowed)
	}
	if l.Allow("10.0.0.2") != true {
		t.Fatal("another source shares the first one's budget")
	}
	if len(got) != 0 {
		t.Fatal("summary before the window ended")
	}
	c.add(time.Minute)
	l.Flush()
	if len(got) != 1 || got[0] != "10.0.0.1" || counts[0] != 997 {
		t.Fatalf("summaries %v %v, want one for 10.0.0.1 with 997", got, counts)
	}
	if l.Tracked() != 0 {
		t.Fatalf("%d keys still tracked after their window", l.Tracked())
	}
	if !l.Allow("10.0.0.1") {
		t.Fatal("budget not refilled after the window")
	}
}

func TestLimiterBoundedKeys(t *testing.T) {
	c := newClock()
	suppressed := 0
	l := New(c.opts(Options{Burst: 1, MaxKeys: 100, Summary: func(_ string, n int, _ time.Duration) { suppressed += n }}))
	allowed := 0
	for i := 0; i < 100000; i++ {
		if l.Allow(strings.Repeat("x", i%7) + string(rune('a'+i%26)) + string(rune(i))) {
			allowed++
		}
	}
	if l.Tracked() > 101 {
		t.Fatalf("%d keys tracked, bound is 100 plus the overflow key", l.Tracked())
	}
	if allowed > 101 {
		t.Fatalf("%d events let through with 100 keys of burst 1", allowed)
	}
	c.add(2 * time.Minute)
	l.Flush()
	if allowed+suppressed != 100000 {
		t.Fatalf("allowed %d + summarised %d != 100000: events lost from the count", allowed, suppressed)
	}
}

func TestLimiterConcurrent(t *testing.T) {
	l := New(Options{Burst: 10})
	var wg sync.WaitGroup
	var mu sync.Mutex
	allowed := 0
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				if l.Allow("k") {
					mu.Lock()
					allowed++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if allowed != 10 {
		t.Fatalf("allowed %d under concurrency, want 10", allowed)
	}
}

func strconvUnquote(s string) (string, error) { return strconv.Unquote(`"` + s + `"`) }

func TestLimiterFlushAll(t *testing.T) {
	c := newClock()
	sums := map[string]int{}
	l := New(c.opts(Options{Burst: 1, Summary: func(k string, n int, _ time.Duration) { sums[k] += n }}))
	for range 10 {
		l.Allow("a")
	}
	l.Allow("b") // nothing suppressed: no summary
	l.Flush()
	if len(sums) != 0 {
		t.Fatalf("Flush summarised an open window: %v", sums)
	}
	l.FlushAll()
	if len(sums) != 1 || sums["a"] != 9 || l.Tracked() != 0 {
		t.Fatalf("FlushAll: %v, %d keys tracked", sums, l.Tracked())
	}
	l.FlushAll()
	if sums["a"] != 9 {
		t.Fatal("FlushAll summarised twice")
	}
}

// TestLimiterGlobalBoundManySources: M2. 5,000 sources (more than MaxKeys)
// each sending refusals of two codes: the events let through in full in a
// window stay within the global budget (a bucket of Global: at most
// 2×Global in any window) whatever the number of sources; every event is
// either let through or in exactly one summary; the summaries are bounded
// by the summary budget (plus one aggregate), and each carries its source
// and the counts per code.
func TestLimiterGlobalBoundManySources(t *testing.T) {
	c := newClock()
	const global, budget, sources, windows = 50, 100, 5000, 3
	var mu sync.Mutex
	var sums []Summary
	l := New(c.opts(Options{Burst: 5, Global: global, Summaries: budget, MaxKeys: 4096, Window: time.Minute,
		Report: func(s Summary) { mu.Lock(); sums = append(sums, s); mu.Unlock() }}))
	events, full := 0, 0
	for w := range windows {
		fullThisWindow := 0
		for i := range sources {
			key := "10.0." + strconv.Itoa(i/256) + "." + strconv.Itoa(i%256)
			for j := range 4 {
				code := "malformed_json"
				if j%2 == 1 {
					code = "token_invalid"
				}
				events++
				if l.AllowCode(key, code) {
					full++
					fullThisWindow++
				}
			}
		}
		if fullThisWindow > 2*global {
			t.Fatalf("window %d: %d events in full, global budget %d", w, fullThisWindow, global)
		}
		c.add(time.Minute)
		before := len(sums)
		l.Flush()
		if n := len(sums) - before; n > 2*budget+1 {
			t.Fatalf("window %d: %d summaries, budget %d (+1 aggregate)", w, n, budget)
		}
	}
	l.FlushAll()
	summarised, aggregates := 0, 0
	for _, s := range sums {
		summarised += s.Total
		sum := 0
		for _, cc := range s.Codes {
			sum += cc.N
			if cc.Code != "malformed_json" && cc.Code != "token_invalid" {
				t.Fatalf("summary %+v: code %q", s, cc.Code)
			}
		}
		if sum != s.Total || s.Key == "" {
			t.Fatalf("summary %+v: codes sum to %d", s, sum)
		}
		if s.Key == AggregateKey {
			aggregates++
			if s.Sources < 2 {
				t.Fatalf("aggregate stands for %d sources", s.Sources)
			}
		} else if s.Key != OverflowKey && (len(s.Codes) != 2 || !strings.Contains(s.CodesString(), "malformed_json ×") || !strings.Contains(s.CodesString(), "token_invalid ×")) {
			t.Fatalf("per-source summary %+v (%s) lacks the per-code counts", s, s.CodesString())
		}
	}
	if full+summarised != events {
		t.Fatalf("%d in full + %d summarised != %d events", full, summarised, events)
	}
	if aggregates == 0 {
		t.Fatal("no aggregate summary although the budget was exceeded")
	}
	t.Logf("%d events, %d in full, %d summaries (%d aggregates)", events, full, len(sums), aggregates)
}

// TestLimiterBurstPerCode: the burst is per key and code: one source gets
// Burst events in full per code, while the global budget lasts.
func TestLimiterBurstPerCode(t *testing.T) {
	c := newClock()
	var sums []Summary
	l := New(c.opts(Options{Burst: 1, Global: 3, Report: func(s Summary) { sums = append(sums, s) }}))
	got := []bool{l.AllowCode("a", "x"), l.AllowCode("a", "x"), l.AllowCode("a", "y"), l.AllowCode("b", "x"), l.AllowCode("b", "y")}
	want := []bool{true, false, true, true, false} // b/y: global budget spent
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("event %d: %v, want %v (all %v)", i, got[i], want[i], got)
		}
	}
	l.FlushAll()
	if len(sums) != 2 {
		t.Fatalf("summaries %+v", sums)
	}
}
