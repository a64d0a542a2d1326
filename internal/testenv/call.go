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
	req, _ := http.NewRequest(method, g.URL()+path, strings.NewReader(body))
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: g.Roots(), Certificates: []tls.Certificate{cert}}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Timeout: 10 * time.Second, Transport: tr}).Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var e api.Error
	if resp.StatusCode/100 != 2 {
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatalf("%s %s: error body is not JSON: %q", method, path, b)
		}
	}
	return resp.StatusCode, e
}
