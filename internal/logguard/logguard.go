// Package logguard bounds what an unauthenticated peer can make fleetgate
// log or audit: Clip shortens and quotes attacker-controlled strings, and a
// Limiter lets through a few events per source, code and window, within a
// global budget shared by every source, and summarises the rest per source
// with a count per code ("N more refusals from KEY in the last 1m0s: code a
// ×n, code b ×m"), with memory and summary volume bounded whatever the
// number of sources.
package logguard

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// DefaultClip is the longest attacker-controlled string, in bytes, that
// Clip keeps by default.
const DefaultClip = 128

// Clip returns s bounded to max bytes (DefaultClip when max <= 0), cut at a
// rune boundary, with invalid UTF-8 and control characters escaped, and a
// marker saying how long the original was when it was cut. Use it on every
// string a peer chose before it reaches a log line or an audit record.
func Clip(s string, max int) string {
	if max <= 0 {
		max = DefaultClip
	}
	cut := false
	if len(s) > max {
		i := max
		for i > 0 && !utf8.RuneStart(s[i]) {
			i--
		}
		s, cut = s[:i], true
	}
	q := strconv.Quote(s)
	q = q[1 : len(q)-1] // keep the escaping, drop the quotes
	if cut {
		return q + cutMarker
	}
	return q
}

// Bound returns s unchanged when it is at most max bytes (DefaultClip when
// max <= 0) of valid UTF-8 without control characters, and Clip(s, max)
// otherwise: a readable field stays as it was, anything a peer could use to
// grow a record or forge a line is shortened and escaped.
func Bound(s string, max int) string {
	if max <= 0 {
		max = DefaultClip
	}
	if len(s) <= max && utf8.ValidString(s) {
		clean := true
		for _, r := range s {
			if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) || r == 0x2028 || r == 0x2029 {
				clean = false
				break
			}
		}
		if clean {
			return s
		}
	}
	// Clip bounds the input; escaping can make its output up to six times
	// longer: shorten the input until the output fits too.
	q := Clip(s, max)
	for m := max; len(q) > max+len(cutMarker) && m > 1; {
		if m = m * max / len(q); m < 1 {
			m = 1
		}
		q = Clip(s, m)
	}
	return q
}

const cutMarker = "…(cut)"

// Options configures a Limiter. Zero fields take the defaults.
type Options struct {
	// Burst is how many events per key and code are let through in full
	// in each Window (within Global).
	Burst int // default 5
	// Global bounds the events let through in full across all keys: a
	// token bucket of Global tokens refilled at Global per Window, so that
	// at most about 2×Global are let through in any Window however many
	// sources there are. 0: no global bound.
	Global int
	// Summaries bounds the summaries reported per Window (a token bucket
	// like Global). A summary over the budget is merged into one aggregate
	// summary, key AggregateKey, with the number of sources it stands for
	// and the counts per code, reported by the next Flush. 0: no bound.
	Summaries int
	// Window is the period after which a key's budget is refilled and its
	// suppressed events are summarised.
	Window time.Duration // default 1 minute
	// MaxKeys bounds the number of keys tracked; beyond it all new keys
	// share one overflow key, "other" (so at most MaxKeys+1 are held); its
	// counts per code are kept.
	MaxKeys int // default 4096
	// Summary is called, outside the Limiter's lock, once per key and
	// window in which events were suppressed, with their total. Nil:
	// nothing is called. Report, if set, is called instead.
	Summary func(key string, suppressed int, window time.Duration)
	// Report is Summary with the counts per code.
	Report func(Summary)
	// Now is the clock (tests).
	Now func() time.Time
}

// OverflowKey is the key under which events are counted once MaxKeys keys
// are tracked.
const OverflowKey = "other"

// AggregateKey is the key of the summary that merges the summaries over
// the Summaries budget.
const AggregateKey = "other sources"

// maxCodes bounds the codes counted per key; beyond it, OverflowKey.
const maxCodes = 32

// CodeCount is the number of events of one code suppressed for a key.
type CodeCount struct {
	Code string
	N    int
}

// Summary reports the suppressed events of a key in a window.
type Summary struct {
	Key string
	// Sources is how many keys the summary stands for: 1, or more for
	// AggregateKey.
	Sources int
	// Total is the sum of Codes.
	Total int
	// Codes are the counts per code, most frequent first ("" is the code
	// of Allow).
	Codes  []CodeCount
	Window time.Duration
}

// CodesString renders the counts as "code a ×n, code b ×m".
func (s Summary) CodesString() string {
	var b strings.Builder
	for i, c := range s.Codes {
		if i > 0 {
			b.WriteString(", ")
		}
		code := c.Code
		if code == "" {
			code = "-"
		}
		fmt.Fprintf(&b, "%s ×%d", code, c.N)
	}
	return b.String()
}

type codeEntry struct {
	code       string
	allowed    int
	suppressed int
}

type entry struct {
	start time.Time
	codes []codeEntry
}

func (e *entry) code(c string) *codeEntry {
	for i := range e.codes {
		if e.codes[i].code == c {
			return &e.codes[i]
		}
	}
	if len(e.codes) >= maxCodes {
		c = OverflowKey
		for i := range e.codes {
			if e.codes[i].code == c {
				return &e.codes[i]
			}
		}
	}
	e.codes = append(e.codes, codeEntry{code: c})
	return &e.codes[len(e.codes)-1]
}

// summary returns the summary of e's suppressed events, ok false if none.
func (e *entry) summary(key string, window time.Duration) (Summary, bool) {
	s := Summary{Key: key, Sources: 1, Window: window}
	for _, c := range e.codes {
		if c.suppressed > 0 {
			s.Codes = append(s.Codes, CodeCount{c.code, c.suppressed})
			s.Total += c.suppressed
		}
	}
	sortCodes(s.Codes)
	return s, s.Total > 0
}

func sortCodes(cs []CodeCount) {
	slices.SortFunc(cs, func(a, b CodeCount) int {
		if a.N != b.N {
			return b.N - a.N
		}
		return strings.Compare(a.Code, b.Code)
	})
}

// bucket is a token bucket of n tokens refilled at n per window; n = 0
// never runs out.
type bucket struct {
	n      int
	tokens float64
	last   time.Time
}

func (b *bucket) take(now time.Time, window time.Duration) bool {
	if b.n <= 0 {
		return true
	}
	if b.last.IsZero() {
		b.tokens = float64(b.n)
	} else if d := now.Sub(b.last); d > 0 {
		b.tokens = min(float64(b.n), b.tokens+float64(b.n)*float64(d)/float64(window))
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// Limiter decides, per key (a source address, a device) and code, whether
// an event is recorded in full or only counted. Safe for concurrent use.
type Limiter struct {
	o         Options
	mu        sync.Mutex
	keys      map[string]*entry
	swept     time.Time // last sweep for expired keys while full
	global    bucket    // full events across all keys
	summaries bucket    // summaries reported
	agg       Summary   // summaries over budget, merged; reported by Flush
}

// New returns a Limiter with o's defaults filled in.
func New(o Options) *Limiter {
	if o.Burst <= 0 {
		o.Burst = 5
	}
	if o.Window <= 0 {
		o.Window = time.Minute
	}
	if o.MaxKeys <= 0 {
		o.MaxKeys = 4096
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Limiter{o: o, keys: make(map[string]*entry),
		global: bucket{n: o.Global}, summaries: bucket{n: o.Summaries}}
}

// Allow reports whether an event for key should be recorded in full. When
// it returns false the event is counted and will be summarised. It is
// AllowCode(key, "").
func (l *Limiter) Allow(key string) bool { return l.AllowCode(key, "") }

// AllowCode reports whether an event of code for key should be recorded in
// full: at most Burst per key and code in a window, and only while the
// global budget lasts. When it returns false the event is counted under
// key and code and will be summarised.
func (l *Limiter) AllowCode(key, code string) bool {
	now := l.o.Now()
	var due []Summary
	l.mu.Lock()
	e := l.keys[key]
	if e == nil {
		// full: sweep expired keys, at most ten times a window so that a
		// flood of new sources costs no scan per event
		if len(l.keys) >= l.o.MaxKeys && now.Sub(l.swept) >= l.o.Window/10 {
			l.swept = now
			due = l.expireLocked(now, due)
		}
		if len(l.keys) >= l.o.MaxKeys {
			key = OverflowKey
			e = l.keys[key]
		}
		if e == nil {
			e = &entry{start: now}
			l.keys[key] = e
		}
	}
	if now.Sub(e.start) >= l.o.Window {
		if s, ok := e.summary(key, l.o.Window); ok {
			due = append(due, s)
		}
		*e = entry{start: now, codes: e.codes[:0]}
	}
	c := e.code(code)
	ok := c.allowed < l.o.Burst && l.global.take(now, l.o.Window)
	if ok {
		c.allowed++
	} else {
		c.suppressed++
	}
	due = l.budgetLocked(now, due)
	l.mu.Unlock()
	l.report(due)
	return ok
}

// budgetLocked keeps the summaries of due that the summary budget allows
// and merges the others into the aggregate.
func (l *Limiter) budgetLocked(now time.Time, due []Summary) []Summary {
	out := due[:0]
	for _, s := range due {
		if l.summaries.take(now, l.o.Window) {
			out = append(out, s)
			continue
		}
		l.agg.Sources += s.Sources
		l.agg.Total += s.Total
		for _, c := range s.Codes {
			i := slices.IndexFunc(l.agg.Codes, func(a CodeCount) bool { return a.Code == c.Code })
			if i < 0 {
				l.agg.Codes = append(l.agg.Codes, c)
			} else {
				l.agg.Codes[i].N += c.N
			}
		}
	}
	return out
}

// aggregateLocked returns the aggregate summary, if any, and resets it.
func (l *Limiter) aggregateLocked(due []Summary) []Summary {
	if l.agg.Total == 0 {
		return due
	}
	s := l.agg
	s.Key, s.Window = AggregateKey, l.o.Window
	sortCodes(s.Codes)
	l.agg = Summary{}
	return append(due, s)
}

// expireLocked drops keys whose window ended, collecting their summaries.
func (l *Limiter) expireLocked(now time.Time, due []Summary) []Summary {
	for k, e := range l.keys {
		if now.Sub(e.start) >= l.o.Window {
			if s, ok := e.summary(k, l.o.Window); ok {
				due = append(due, s)
			}
			delete(l.keys, k)
		}
	}
	return due
}

// Flush summarises and forgets every key whose window has ended, and
// reports the aggregate of the summaries over budget. Run calls it
// periodically; tests may call it directly.
func (l *Limiter) Flush() {
	now := l.o.Now()
	l.mu.Lock()
	due := l.budgetLocked(now, l.expireLocked(now, nil))
	due = l.aggregateLocked(due)
	l.mu.Unlock()
	l.report(due)
}

// FlushAll summarises every key with suppressed events, whether or not its
// window has ended, and forgets the keys (shutdown, tests). The summary
// budget applies; the aggregate is reported last.
func (l *Limiter) FlushAll() {
	now := l.o.Now()
	l.mu.Lock()
	var due []Summary
	for k, e := range l.keys {
		if s, ok := e.summary(k, l.o.Window); ok {
			due = append(due, s)
		}
	}
	clear(l.keys)
	due = l.aggregateLocked(l.budgetLocked(now, due))
	l.mu.Unlock()
	l.report(due)
}

// Tracked returns the number of keys currently tracked (tests, metrics).
func (l *Limiter) Tracked() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}

// Run flushes every Window until ctx ends, so that a burst's summary is
// written even when its source goes quiet.
func (l *Limiter) Run(ctx context.Context) {
	t := time.NewTicker(l.o.Window)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			l.Flush()
		}
	}
}

func (l *Limiter) report(due []Summary) {
	for _, s := range due {
		switch {
		case l.o.Report != nil:
			l.o.Report(s)
		case l.o.Summary != nil:
			l.o.Summary(s.Key, s.Total, s.Window)
		}
	}
}

// LogSummary returns a Summary function that writes one WARN line per
// suppressed key: msg, key, count and window.
func LogSummary(log *slog.Logger, msg string) func(string, int, time.Duration) {
	return func(key string, n int, window time.Duration) {
		log.Warn(msg, "source", key, "suppressed", n, "window", window.String())
	}
}
