package testenv

import (
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
)

// Call sends a raw request to the API with cert as the client
// certificate and returns the status and, for a status other than 2xx,
// the error body (which must be JSON).
func (g *Gateway) Call(t testing.TB, cert tls.Certificate, method, path, body string) (int, api.Error) {
	t.Helper()
	r := g.CallWith(t, &cert, 0, method, path, body)
	return r.Status, r.Err
}

// Reply is an API answer as CallWith returns it.
type Reply struct {
	Status int
	Header http.Header
	Err    api.Error // for a status other than 2xx
}

// CallWith is Call with the client certificate optional (nil: none), the
// client's timeout (0: 10 s), and the answer's headers.
func (g *Gateway) CallWith(t testing.TB, cert *tls.Certificate, timeout time.Duration, method, path, body string) Reply {
	t.Helper()
	req, _ := http.NewRequest(method, g.URL()+path, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	tc := &tls.Config{RootCAs: g.Roots()}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	tr := &http.Transport{TLSClientConfig: tc}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Timeout: timeout, Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r := Reply{Status: resp.StatusCode, Header: resp.Header}
	if resp.StatusCode/100 != 2 {
		if err := json.Unmarshal(b, &r.Err); err != nil {
			t.Fatalf("%s %s: error body is not JSON: %q", method, path, b)
		}
	}
	return r
}
