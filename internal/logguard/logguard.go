// Package logguard bounds what an unauthenticated peer can make fleetgate
// log or audit: Clip shortens and quotes attacker-controlled strings, and a
// Limiter lets through a few refusals per source and window and summarises
// the rest ("N more refusals from KEY in the last 1m0s"), with memory bounded
// by a fixed number of tracked sources.
package logguard

import (
	"context"
	"log/slog"
	"strconv"
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
	// Burst is how many events per key are let through in each Window.
	Burst int // default 5
	// Window is the period after which a key's budget is refilled and its
	// suppressed events are summarised.
	Window time.Duration // default 1 minute
	// MaxKeys bounds the number of keys tracked; beyond it all new keys
	// share one overflow key, "other" (so at most MaxKeys+1 are held).
	MaxKeys int // default 4096
	// Summary is called, outside the Limiter's lock, once per key and
	// window in which events were suppressed. Nil: nothing is called.
	Summary func(key string, suppressed int, window time.Duration)
	// Now is the clock (tests).
	Now func() time.Time
}

// OverflowKey is the key under which events are counted once MaxKeys keys
// are tracked.
const OverflowKey = "other"

type entry struct {
	start      time.Time
	allowed    int
	suppressed int
}

// Limiter decides, per key (a source address, a device), whether an event
// is recorded in full or only counted. Safe for concurrent use.
type Limiter struct {
	o     Options
	mu    sync.Mutex
	keys  map[string]*entry
	swept time.Time // last sweep for expired keys while full
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
	return &Limiter{o: o, keys: make(map[string]*entry)}
}

type summary struct {
	key string
	n   int
}

// Allow reports whether an event for key should be recorded in full. When
// it returns false the event is counted and will be summarised.
func (l *Limiter) Allow(key string) bool {
	now := l.o.Now()
	var due []summary
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
		if e.suppressed > 0 {
			due = append(due, summary{key, e.suppressed})
		}
		*e = entry{start: now}
	}
	ok := e.allowed < l.o.Burst
	if ok {
		e.allowed++
	} else {
		e.suppressed++
	}
	l.mu.Unlock()
	l.report(due)
	return ok
}

// expireLocked drops keys whose window ended, collecting their summaries.
func (l *Limiter) expireLocked(now time.Time, due []summary) []summary {
	for k, e := range l.keys {
		if now.Sub(e.start) >= l.o.Window {
			if e.suppressed > 0 {
				due = append(due, summary{k, e.suppressed})
			}
			delete(l.keys, k)
		}
	}
	return due
}

// Flush summarises and forgets every key whose window has ended. Run calls
// it periodically; tests may call it directly.
func (l *Limiter) Flush() {
	l.mu.Lock()
	due := l.expireLocked(l.o.Now(), nil)
	l.mu.Unlock()
	l.report(due)
}

// FlushAll summarises every key with suppressed events, whether or not its
// window has ended, and forgets the keys (shutdown, tests).
func (l *Limiter) FlushAll() {
	l.mu.Lock()
	var due []summary
	for k, e := range l.keys {
		if e.suppressed > 0 {
			due = append(due, summary{k, e.suppressed})
		}
	}
	clear(l.keys)
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

func (l *Limiter) report(due []summary) {
	if l.o.Summary == nil {
		return
	}
	for _, s := range due {
		l.o.Summary(s.key, s.n, l.o.Window)
	}
}

// LogSummary returns a Summary function that writes one WARN line per
// suppressed key: msg, key, count and window.
func LogSummary(log *slog.Logger, msg string) func(string, int, time.Duration) {
	return func(key string, n int, window time.Duration) {
		log.Warn(msg, "source", key, "suppressed", n, "window", window.String())
	}
}
