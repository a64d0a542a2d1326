package cluster

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/operator/client"
)

// answer is what a raw API request got: status, Retry-After, error code.
type answer struct {
	status     int
	retryAfter string
	code       string
}

// rawCall sends body (JSON) to node g's API with cert (may be nil) and
// returns the answer, headers included (the admin client hides them).
// The client waits long: a write without quorum fails after the store's
// own timeout (10 s per transaction).
func rawCall(t *testing.T, g *testenv.Gateway, cert *tls.Certificate, method, path string, body any) answer {
	t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	r := g.CallWith(t, cert, 90*time.Second, method, path, string(b))
	return answer{status: r.Status, retryAfter: r.Header.Get("Retry-After"), code: r.Err.Code}
}

// Quorum lost: the routes of two of the three nodes are cut, so no node
// has a majority. An enrollment through node 1 answers 503
// store_unavailable with Retry-After (not 500), and an operator's write
// 503 with Retry-After (store_unavailable, or directory_stale once the
// node's view is stale). After the heal the same token enrolls, or, if
// the refused enrollment's batch (its commit timed out, so its outcome
// was unknown) applied after the heal, is used; either way the records
// hold it whole: the token used, the device with its certificate.
func TestClusterStoreUnavailableAnswers503ThenHeals(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	n1 := c.Nodes[0]
	tok := n1.Token(t, "quorum-1", "fleet", time.Hour)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "quorum-1"}}, key)
	if err != nil {
		t.Fatal(err)
	}
	enrollReq := api.TokenEnrollRequest{Token: tok, DeviceID: "quorum-1", CSR: csr}
	creds := client.FromDataDir(n1.DataDir)
	opCert, err := tls.LoadX509KeyPair(creds.CertFile, creds.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	tokenReq := api.TokenCreateRequest{DeviceID: "quorum-2", Group: "fleet", TTL: time.Hour}

	c.Mesh.Cut(1)
	c.Mesh.Cut(2)
	want := fmt.Sprint(enroll.RetryAfterSeconds)
	if a := rawCall(t, n1, nil, http.MethodPost, api.PathEnrollToken, enrollReq); a.status != http.StatusServiceUnavailable || a.code != "store_unavailable" || a.retryAfter != want {
		t.Fatalf("token enrollment without quorum: %+v, want 503 store_unavailable, Retry-After %s", a, want)
	}
	if a := rawCall(t, n1, &opCert, http.MethodPost, api.PathAdminTokens, tokenReq); a.status != http.StatusServiceUnavailable ||
		(a.code != "store_unavailable" && a.code != "directory_stale") || a.retryAfter != want {
		t.Fatalf("operator's token creation without quorum: %+v, want 503 store_unavailable or directory_stale, Retry-After %s", a, want)
	}
	if !strings.Contains(n1.Logs.String(), "store_unavailable") {
		t.Error("the 503 store_unavailable refusal is not logged")
	}

	c.Mesh.Heal(1)
	c.Mesh.Heal(2)
	// Every node fresh again (the records are read through node 2 below).
	testenv.Eventually(t, 90*time.Second, func() error {
		for i, n := range c.Nodes {
			if code := n.Ready(); code != http.StatusOK {
				return fmt.Errorf("node %d: /readyz %d", i+1, code)
			}
		}
		return nil
	})
	// The same token enrolls, unless the refused attempt's batch, whose
	// commit timed out, applied after the heal (whole): then the token is
	// used and the device and its certificate are recorded.
	var a answer
	testenv.Eventually(t, 60*time.Second, func() error {
		a = rawCall(t, n1, nil, http.MethodPost, api.PathEnrollToken, enrollReq)
		if a.status != http.StatusOK && a.code != "token_used" {
			return fmt.Errorf("enrollment after the heal: %+v", a)
		}
		return nil
	})
	t.Logf("enrollment after the heal: %+v", a)
	testenv.Eventually(t, 60*time.Second, func() error {
		if a = rawCall(t, n1, &opCert, http.MethodPost, api.PathAdminTokens, tokenReq); a.status != http.StatusCreated {
			return fmt.Errorf("token creation after the heal: %+v", a)
		}
		return nil
	})
	// The records, read through another node: the device with its
	// certificate, its token used, and one or two unused tokens for
	// quorum-2 (two if the refused creation applied after the heal).
	n2 := c.Nodes[1]
	// A node may be stale again for a moment, or its store without a
	// leader (elections after the heal): its 503 directory_stale or
	// store_unavailable is retried, anything else fails.
	var devs []api.Device
	var toks []api.Token
	testenv.Eventually(t, 60*time.Second, func() error {
		var err error
		if devs, err = n2.Admin.DevicesPage(context.Background(), nil); err == nil {
			toks, err = n2.Admin.Tokens(context.Background(), nil)
		}
		if err != nil && !testenv.IsUnavailable(err) {
			t.Fatal(err)
		}
		return err
	})
	if len(devs) != 1 || devs[0].ID != "quorum-1" || devs[0].State != "active" || devs[0].Serial == "" {
		t.Fatalf("devices after the heal: %+v", devs)
	}
	states := map[string]int{}
	for _, tk := range toks {
		states[tk.DeviceID+":"+tk.State]++
	}
	if states["quorum-1:used"] != 1 || states["quorum-2:unused"] < 1 || len(toks) != 1+states["quorum-2:unused"] {
		t.Fatalf("tokens after the heal: %+v", toks)
	}
}
