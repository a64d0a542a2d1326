package console_test

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/chromedp/chromedp"
	"github.com/chromedp/chromedp/kb"

	"github.com/fleetgate/fleetgate/console"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// chromiumPath finds Debian's chromium. Missing, the test is skipped,
// unless FLEETGATE_REQUIRE_TOOLS is set: then it fails.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"chromium", "/usr/bin/chromium"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if _, required := os.LookupEnv("FLEETGATE_REQUIRE_TOOLS"); required {
		t.Fatal("chromium is missing (Debian package chromium) and FLEETGATE_REQUIRE_TOOLS is set")
	}
	t.Skip("chromium is missing (Debian package chromium); set FLEETGATE_REQUIRE_TOOLS=1 to make this a failure")
	return ""
}

// artifacts is where screenshots go: $FLEETGATE_ARTIFACTS/console, else a
// directory of the test. Never the repository.
func artifacts(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("FLEETGATE_ARTIFACTS")
	if dir == "" {
		return t.TempDir()
	}
	dir = filepath.Join(dir, "console")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// spkiHash is the base64 SHA-256 of the server certificate's public key:
// the browser trusts that key only (--ignore-certificate-errors-spki-list),
// not every certificate.
func spkiHash(t *testing.T, dataDir string) string {
	t.Helper()
	c, err := tls.LoadX509KeyPair(filepath.Join(dataDir, ca.ServerCertFile), filepath.Join(dataDir, ca.ServerKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(c.Leaf.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(h[:])
}

// profileDir is a fresh user-data-dir. Chromium's helper processes can
// still write in it for a moment after the browser stopped, so its removal
// is retried (bounded) rather than left to t.TempDir.
func profileDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fleetgate-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for range 50 {
			if err := os.RemoveAll(dir); err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Logf("could not remove %s", dir)
	})
	return dir
}

// weight is a page's bytes (document and subresources, decoded) and its
// load time in the browser.
type weight struct {
	Bytes float64 `json:"bytes"`
	MS    float64 `json:"ms"`
}

const weightJS = `(() => {
  const n = performance.getEntriesByType('navigation')[0];
  if (!n || !n.loadEventEnd) { return null; }
  let bytes = n.decodedBodySize;
  for (const r of performance.getEntriesByType('resource')) {
    if (!r.name.endsWith('/events')) { bytes += r.decodedBodySize; }
  }
  return {bytes: bytes, ms: n.loadEventEnd - n.startTime};
})()`

// a11yJS lists what fails the basic accessibility checks of a page: form
// controls without a label, buttons and links without a name, unnamed
// charts, the document's language, one h1.
const a11yJS = `(() => {
  const bad = [];
  document.querySelectorAll('input:not([type=hidden]),select,textarea').forEach(e => {
    if (!(e.labels && e.labels.length) && !e.getAttribute('aria-label')) { bad.push('unlabelled ' + e.outerHTML.slice(0, 80)); }
  });
  document.querySelectorAll('button,a').forEach(e => {
    if (!e.textContent.trim() && !e.getAttribute('aria-label')) { bad.push('unnamed ' + e.outerHTML.slice(0, 80)); }
  });
  document.querySelectorAll('svg').forEach(e => { if (!e.getAttribute('aria-label')) { bad.push('svg without aria-label'); } });
  document.querySelectorAll('table').forEach(e => { if (!e.caption) { bad.push('table without caption'); } });
  if (!document.documentElement.lang) { bad.push('no lang'); }
  if (document.querySelectorAll('h1').length !== 1) { bad.push('not one h1'); }
  if (!document.querySelector('main')) { bad.push('no main'); }
  return bad;
})()`

const activeJS = `(e => (e.textContent || '').trim() || e.getAttribute('aria-label') || e.id || e.tagName)(document.activeElement)`

// TestConsoleInChromium drives the console in Debian's Chromium: sign in
// with a minted link, find a device, revoke it through the confirmation
// dialog, see its live MQTT session closed and the audit row appear
// without a reload, see a refusal arrive live; labels and Tab order; a
// screenshot of every page, with its weight and load time.
func TestConsoleInChromium(t *testing.T) {
	chrome := chromiumPath(t)
	out := artifacts(t)
	e := start(t, console.Options{SampleEvery: 300 * time.Millisecond, Heartbeat: time.Second})
	g := e.g
	for i := range 3 {
		g.EnrollDevice(t, fmt.Sprintf("dev-field-%d", i), "field")
	}
	dev := g.EnrollDevice(t, "dev-live", "lab")
	tc, err := dev.TLSConfig("localhost")
	if err != nil {
		t.Fatal(err)
	}
	tc.RootCAs = g.Roots()
	lost := make(chan error, 1)
	mq, err := g.MQTT(t, "dev-live", nil, func(o *paho.ClientOptions) {
		o.SetTLSConfig(tc)
		o.SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err })
	})
	if err != nil {
		t.Fatalf("device connect: %v", err)
	}

	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chrome),
		chromedp.Flag("headless", true),
		chromedp.Flag("no-sandbox", true),
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("ignore-certificate-errors-spki-list", spkiHash(t, g.DataDir)),
		chromedp.UserDataDir(profileDir(t)),
		chromedp.WindowSize(1100, 800),
	}
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc() // stops the browser (its process, by PID)
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	step := func(name string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, c := context.WithTimeout(ctx, 30*time.Second)
		defer c()
		if err := chromedp.Do(sctx, steps...); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	eval := func(expr string, v any) {
		t.Helper()
		sctx, c := context.WithTimeout(ctx, 30*time.Second)
		defer c()
		switch p := v.(type) {
		case *string:
			*p, err = chromedp.Run(sctx, chromedp.Evaluate[string](expr))
		case *[]string:
			*p, err = chromedp.Run(sctx, chromedp.Evaluate[[]string](expr))
		case *bool:
			*p, err = chromedp.Run(sctx, chromedp.Evaluate[bool](expr))
		case *weight:
			*p, err = chromedp.Run(sctx, chromedp.Poll[weight](weightJS, chromedp.WithPollingTimeout(10*time.Second)))
		}
		if err != nil {
			t.Fatalf("evaluate %.60s: %v", expr, err)
		}
	}
	// Start the browser (first Run without a timeout: it lives as long as ctx).
	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1100, 800)); err != nil {
		t.Fatal(err)
	}
	shot := func(name string) {
		t.Helper()
		var w weight
		eval("", &w)
		var bad []string
		eval(a11yJS, &bad)
		if len(bad) > 0 {
			t.Errorf("%s: accessibility: %v", name, bad)
		}
		sctx, c := context.WithTimeout(ctx, 30*time.Second)
		defer c()
		png, err := chromedp.Run(sctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(out, "console-"+name+".png")
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("page %-9s %6.1f KB, loaded in %4.0f ms; screenshot %s (%d KB)", name, w.Bytes/1024, w.MS, p, len(png)/1024)
	}

	// Sign in with a minted link: the overview.
	step("sign in", chromedp.Navigate(e.link(t)), chromedp.WaitVisible(chromedp.CSS("#online-now")))
	var title, online string
	eval(`document.title`, &title)
	eval(`document.getElementById('online-now').textContent`, &online)
	if !strings.HasPrefix(title, "Overview") || online != "1" {
		t.Fatalf("overview: title %q, online %q", title, online)
	}
	step("live", chromedp.Poll[chromedp.Void](`document.getElementById('live-status').textContent.includes('Live')`, chromedp.WithPollingTimeout(10*time.Second)))
	shot("overview")

	// Keyboard: the Tab order starts with the skip link, the navigation
	// and sign-out, in reading order.
	var order []string
	for range 6 {
		step("tab", chromedp.KeyEvent(kb.Tab))
		var a string
		eval(activeJS, &a)
		order = append(order, a)
	}
	want := []string{"Skip to content", "Overview", "Devices", "Audit log", "Policy", "Sign out"}
	if strings.Join(order, "|") != strings.Join(want, "|") {
		t.Errorf("Tab order %q, want %q", order, want)
	}

	// Find the device: search by keyboard on the devices page.
	step("devices", chromedp.Click(chromedp.CSS(`nav a[href="/devices"]`)), chromedp.WaitVisible(chromedp.ID("q")))
	shot("devices")
	// Enter submits the form: the filtered page replaces this one (the
	// unfiltered page lists dev-live too, so wait for the new page's URL).
	step("search", chromedp.Focus(chromedp.ID("q")), chromedp.KeyEvent("live"), chromedp.KeyEvent(kb.Enter))
	// Evaluating during the navigation can fail (its context is gone):
	// ask again until the new page answers.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		sctx, c := context.WithTimeout(ctx, 2*time.Second)
		at, err := chromedp.Run(sctx, chromedp.Evaluate[string](`location.search + '|' + document.readyState`))
		c()
		if err == nil && strings.Contains(at, "q=live") && strings.HasSuffix(at, "|complete") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the filtered devices page did not load: %q, %v", at, err)
		}
	}
	step("search result", chromedp.WaitVisible(chromedp.CSS(`a[href="/devices/dev-live"]`)))
	var rows string
	eval(`String(document.querySelectorAll('#live tbody tr').length)`, &rows)
	if rows != "1" {
		t.Fatalf("search for 'live': %s rows", rows)
	}
	step("open device", chromedp.Click(chromedp.CSS(`a[href="/devices/dev-live"]`)), chromedp.WaitVisible(chromedp.ID("session")),
		chromedp.Poll[chromedp.Void](`document.getElementById('live-status').textContent.includes('Live')`, chromedp.WithPollingTimeout(10*time.Second)))
	var session string
	eval(`document.getElementById('session').textContent`, &session)
	if !strings.Contains(session, "online since") || !strings.Contains(session, "127.0.0.1") {
		t.Fatalf("live session: %q", session)
	}
	shot("device")

	// The dialog: Enter opens it, the reason field has the focus, Escape
	// closes it without acting.
	step("dialog by keyboard", chromedp.Focus(chromedp.CSS(`button[data-dialog="dlg-suspend"]`)), chromedp.KeyEvent(kb.Enter),
		chromedp.WaitVisible(chromedp.ID("dlg-suspend")))
	var focused string
	eval(`document.activeElement.id`, &focused)
	if focused != "reason-suspend" {
		t.Errorf("focus in the open dialog: %q, want reason-suspend", focused)
	}
	step("escape", chromedp.KeyEvent(kb.Escape), chromedp.WaitNotVisible(chromedp.ID("dlg-suspend")))

	// Revoke through the confirmation dialog; the page is not reloaded.
	step("mark", chromedp.Evaluate[chromedp.Void](`window.__noReload = 'still here'`))
	step("revoke", chromedp.Click(chromedp.CSS(`button[data-dialog="dlg-revoke"]`)), chromedp.WaitVisible(chromedp.ID("dlg-revoke")),
		chromedp.SendKeys(chromedp.ID("reason-revoke"), "stolen from the lab"))
	shot("confirm")
	step("confirm", chromedp.Click(chromedp.CSS(`#dlg-revoke button[type="submit"]`)))
	step("live update", chromedp.Poll[chromedp.Void](`document.getElementById('device-state').textContent === 'revoked' &&
		document.getElementById('session').textContent.trim() === 'offline' &&
		document.querySelector('#audit tbody').textContent.includes('device.revoke') &&
		document.querySelector('#audit tbody').textContent.includes('console: stolen from the lab')`, chromedp.WithPollingTimeout(20*time.Second)))
	var mark string
	eval(`String(window.__noReload)`, &mark)
	if mark != "still here" {
		t.Fatal("the page was reloaded")
	}
	select {
	case <-lost:
	case <-time.After(20 * time.Second):
		t.Fatal("the device's MQTT session was not closed")
	}
	if mq.IsConnectionOpen() {
		t.Fatal("device still connected")
	}
	shot("revoked")

	// The audit log follows live: an action through the admin API (the
	// CLI's path) appears without a reload.
	step("audit", chromedp.Click(chromedp.CSS(`nav a[href="/audit"]`)), chromedp.WaitVisible(chromedp.ID("audit")),
		chromedp.Poll[chromedp.Void](`document.getElementById('live-status').textContent.includes('Live')`, chromedp.WithPollingTimeout(10*time.Second)))
	if _, err := g.Admin.DeviceAction(context.Background(), "dev-field-1", "suspend", "maintenance"); err != nil {
		t.Fatal(err)
	}
	step("audit live", chromedp.Poll[chromedp.Void](`document.querySelector('#audit tbody tr').textContent.includes('device.suspend')`, chromedp.WithPollingTimeout(20*time.Second)))
	shot("audit")

	// A refused device shows live on the overview.
	step("overview", chromedp.Click(chromedp.CSS(`nav a[href="/"]`)), chromedp.WaitVisible(chromedp.CSS("#online-now")),
		chromedp.Poll[chromedp.Void](`document.getElementById('live-status').textContent.includes('Live')`, chromedp.WithPollingTimeout(10*time.Second)))
	if _, err := g.MQTT(t, "dev-live", nil, func(o *paho.ClientOptions) { o.SetTLSConfig(tc) }); err == nil {
		t.Fatal("revoked device admitted")
	}
	step("refused live", chromedp.Poll[chromedp.Void](`document.getElementById('live-status').textContent.includes('refused') &&
		!document.querySelector('section[aria-labelledby=h-ref] tbody').textContent.includes('No refusals')`, chromedp.WithPollingTimeout(20*time.Second)))
	shot("overview-live")

	// The policy and its explain box.
	step("policy", chromedp.Click(chromedp.CSS(`nav a[href="/policy"]`)), chromedp.WaitVisible(chromedp.ID("identity")),
		chromedp.SendKeys(chromedp.ID("identity"), "device/dev-field-0"),
		chromedp.SendKeys(chromedp.ID("topic"), "devices/dev-field-0/telemetry/t"),
		chromedp.Submit(chromedp.ID("topic")), chromedp.WaitVisible(chromedp.CSS(".answer")))
	var answer string
	eval(`document.querySelector('.answer').textContent`, &answer)
	if !strings.Contains(answer, "Allowed") {
		t.Errorf("explain: %q", answer)
	}
	shot("policy")

	// Sign out: the session and its live stream end.
	step("sign out", chromedp.Click(chromedp.CSS(`.who button`)), chromedp.WaitVisible(chromedp.CSS(".notice")))
	var signedOut string
	eval(`document.body.textContent`, &signedOut)
	if !strings.Contains(signedOut, "signed out") {
		t.Errorf("after sign out: %.200q", signedOut)
	}
}
