package devicesdk_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// An enrolled device presents its certificate only where it authenticates
// with it (renewal), not when it enrolls again: that would cost it a key
// signature (a TPM operation for TPM devices) and the server a check, for
// nothing.
func TestClientCertificateOnlyForRenewal(t *testing.T) {
	g := testenv.Start(t, testenv.Options{})
	dir := filepath.Join(t.TempDir(), "presenter")
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	enrolled, err := devicesdk.New(devicesdk.Config{DeviceID: "presenter", Key: key, StateDir: dir, EnrollURL: g.URL(), RootCAs: g.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	if err := enrolled.EnrollWithToken(context.Background(), g.Token(t, "presenter", "lab", time.Hour)); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	presented := map[string]int{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		presented[r.URL.Path] = len(r.TLS.PeerCertificates)
		mu.Unlock()
		http.Error(w, `{"code":"test","message":"recorded"}`, http.StatusBadRequest)
	}))
	// The device trusts the gateway's CA (stored at enrollment): the
	// recorder's certificate comes from it.
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvCert, err := g.CA.IssueServer([]string{"127.0.0.1"}, srvKey.Public(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv.TLS = &tls.Config{ClientAuth: tls.RequestClientCert,
		Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw, g.CA.Issuing().Raw}, PrivateKey: srvKey, Leaf: srvCert}}}
	srv.StartTLS()
	defer srv.Close()
	roots := g.Roots()

	// The same device (its state directory: key and certificate), pointed
	// at the recording server.
	d, err := devicesdk.New(devicesdk.Config{DeviceID: "presenter", Key: key, StateDir: dir, EnrollURL: srv.URL, RootCAs: roots})
	if err != nil {
		t.Fatal(err)
	}
	if !d.Enrolled() {
		t.Fatal("device state not loaded")
	}
	_ = d.EnrollWithToken(context.Background(), "fgt_x.y") // refused by the recorder
	_ = d.Renew(context.Background())
	mu.Lock()
	defer mu.Unlock()
	if n, ok := presented[api.PathEnrollToken]; !ok || n != 0 {
		t.Errorf("token enrollment: request seen %v, %d certificates presented, want 0", ok, n)
	}
	if n := presented[api.PathRenew]; n == 0 {
		t.Errorf("renewal presented no certificate")
	}
}
