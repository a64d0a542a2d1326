package console_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/console"
)

// TestSignInRefusalsAreLoggedAndBounded (review): a replayed, forged or
// expired sign-in link, and a forged session cookie, are refusals of an
// unauthenticated peer: each is logged with a reason (the project's
// rule), at most a few lines per source however many it sends; the page
// stays the same whatever the reason. And a flood of bogus links from one
// source does not lock the operators out: a link minted during the flood
// still signs in.
func TestSignInRefusalsAreLoggedAndBounded(t *testing.T) {
	e := start(t, console.Options{LinkTTL: time.Minute})
	l := e.link(t)
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("first use: %s", resp.Status)
	}
	if resp, _ := e.get(t, l, ""); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("replayed link: %s", resp.Status)
	}
	logs := e.g.Logs.String()
	if !strings.Contains(logs, "console sign-in refused") || !strings.Contains(logs, "reason=link_unknown") {
		t.Fatalf("a replayed sign-in link is not logged:\n%s", tail(logs))
	}
	// A forged cookie.
	if resp, _ := e.get(t, e.base+"/devices", console.CookieName+"=forged"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("forged cookie: %s", resp.Status)
	}
	if !strings.Contains(e.g.Logs.String(), "reason=no_session") {
		t.Fatalf("a forged session cookie is not logged:\n%s", tail(e.g.Logs.String()))
	}

	// A flood of bogus links from one source (this test's loopback).
	before := strings.Count(e.g.Logs.String(), "console sign-in refused")
	for i := range 200 {
		resp, _ := e.get(t, fmt.Sprintf("%s/login?t=bogus%d.secret", e.base, i), "")
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("bogus link %d: %s", i, resp.Status)
		}
	}
	if n := strings.Count(e.g.Logs.String(), "console sign-in refused") - before; n > 10 {
		t.Errorf("200 bogus links wrote %d log lines: not rate-limited", n)
	}
	// The operator's fresh link still works right after the flood.
	if resp, body := e.get(t, e.link(t), ""); resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("a valid link during a flood of bogus ones: %s %s", resp.Status, body)
	}
}

func tail(s string) string {
	if len(s) > 3000 {
		return s[len(s)-3000:]
	}
	return s
}
