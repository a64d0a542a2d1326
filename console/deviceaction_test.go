package console_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/console"
)

// TestConsoleDeviceActionIsTheAPIs: the console's revoke is the admin
// API's device action: the reason code is inferred from the reason ("stolen"
// is keyCompromise) and an offline device reports no session closed.
func TestConsoleDeviceActionIsTheAPIs(t *testing.T) {
	e := start(t, console.Options{})
	e.g.EnrollDevice(t, "dev-off", "lab")
	cookie, csrf := e.signIn(t)
	code, body := e.post(t, "/devices/dev-off/revoke", cookie, e.base, url.Values{"reason": {"stolen from the van"}, "csrf": {csrf}},
		map[string]string{"X-CSRF-Token": csrf})
	if code != http.StatusOK {
		t.Fatalf("revoke: %d %s", code, body)
	}
	var res api.StateChangeResponse
	if err := json.Unmarshal([]byte(body), &res); err != nil {
		t.Fatal(err)
	}
	if res.State != "revoked" || res.WasOnline || res.SessionsClosed || len(res.RevokedSerials) != 1 {
		t.Fatalf("revoke of an offline device: %+v", res)
	}
	recs, err := e.g.Admin.Audit(context.Background(), "dev-off", 5)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range recs {
		found = found || strings.HasPrefix(r.Reason, "keyCompromise: console: stolen from the van")
	}
	if !found {
		t.Fatalf("no revocation with the inferred reason code in the audit: %+v", recs)
	}
	// An unknown action and a bad device ID fail as in the API.
	if code, _ := e.post(t, "/devices/dev-off/explode", cookie, e.base, url.Values{"reason": {"x"}, "csrf": {csrf}}, nil); code != http.StatusNotFound {
		t.Fatalf("unknown action: %d", code)
	}
}
