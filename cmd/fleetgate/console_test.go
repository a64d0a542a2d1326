package main

import (
	"crypto/tls"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestConsoleLogin: `fleetgate console login` prints a one-time link of
// the console that signs in once; without a console the server says so.
func TestConsoleLogin(t *testing.T) {
	cfg := testenv.Config(t, testenv.Options{})
	cfg.ConsoleAddr = "127.0.0.1:0"
	g := testenv.StartConfig(t, cfg)
	out, errOut, err := runCLI(t, g, "console", "login")
	if err != nil {
		t.Fatalf("%v: %s", err, errOut)
	}
	link := strings.TrimSpace(out)
	if !strings.HasPrefix(link, "https://"+g.Addrs.Console+"/login?t=") || !strings.Contains(errOut, "operator/admin") {
		t.Fatalf("stdout %q stderr %q", out, errOut)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots(), MinVersion: tls.VersionTLS12}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for i, want := range []int{http.StatusSeeOther, http.StatusUnauthorized} {
		resp, err := hc.Get(link)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("use %d of the link: %s, want %d", i+1, resp.Status, want)
		}
	}

	// A server without a console has no such route.
	g2 := testenv.Start(t, testenv.Options{})
	if _, _, err := runCLI(t, g2, "console", "login"); err == nil || !strings.Contains(err.Error(), "runs no web console") {
		t.Fatalf("without a console: %v", err)
	}
}
