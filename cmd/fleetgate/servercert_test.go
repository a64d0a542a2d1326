package main

import (
	"bytes"
	"context"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/server"
)

func runLocal(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	c := root()
	c.SetOut(&out)
	c.SetErr(&out)
	c.SetArgs(args)
	err := c.ExecuteContext(context.Background())
	return out.String(), err
}

// TestInitHostsAndServerCertRenew: `init --host` keeps localhost,
// 127.0.0.1 and ::1 and prints every name; `--no-default-hosts` leaves them
// out; `server-cert renew --host/--remove-host` changes the names and
// renews the operator certificate, which the registry then knows.
func TestInitHostsAndServerCertRenew(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	out, err := runLocal(t, "init", "--data-dir", dir, "--host", "gateway.example.com", "--host", "10.0.0.5")
	if err != nil {
		t.Fatal(err, out)
	}
	want := "gateway.example.com, localhost, 10.0.0.5, 127.0.0.1, ::1"
	if !strings.Contains(out, want) {
		t.Fatalf("init does not print every name (%s):\n%s", want, out)
	}
	srv, err := server.ServerCertificate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := server.CertHosts(srv); !slices.Equal(got, strings.Split(want, ", ")) {
		t.Fatalf("server certificate names %v", got)
	}
	if w := server.ExpiringOwnCerts(dir, time.Now()); len(w) != 0 {
		t.Fatalf("fresh certificates warned about: %v", w)
	}
	if w := server.ExpiringOwnCerts(dir, time.Now().Add(340*24*time.Hour)); len(w) != 2 {
		t.Fatalf("25 days before expiry: want 2 warnings, got %v", w)
	}

	oldSerial := srv.SerialNumber
	out, err = runLocal(t, "server-cert", "renew", "--data-dir", dir, "--host", "gw2.example.com", "--remove-host", "10.0.0.5")
	if err != nil {
		t.Fatal(err, out)
	}
	srv, _ = server.ServerCertificate(dir)
	if got := server.CertHosts(srv); !slices.Equal(got, []string{"gateway.example.com", "localhost", "gw2.example.com", "127.0.0.1", "::1"}) || srv.SerialNumber.Cmp(oldSerial) == 0 {
		t.Fatalf("renewed names %v", got)
	}
	if !strings.Contains(out, "renewed operator certificate: admin") {
		t.Fatalf("operator certificate not renewed:\n%s", out)
	}
	if _, err := runLocal(t, "server-cert", "renew", "--data-dir", dir, "--remove-host", "nothere.example"); err == nil {
		t.Fatal("removing a name the certificate does not hold succeeded")
	}
	out, err = runLocal(t, "server-cert", "show", "--data-dir", dir)
	if err != nil || !strings.Contains(out, "gw2.example.com") || strings.Contains(out, "WARNING") {
		t.Fatalf("show: %v\n%s", err, out)
	}

	dir2 := filepath.Join(t.TempDir(), "data")
	if out, err := runLocal(t, "init", "--data-dir", dir2, "--no-default-hosts", "--host", "a.example"); err != nil {
		t.Fatal(err, out)
	}
	srv, _ = server.ServerCertificate(dir2)
	if got := server.CertHosts(srv); !slices.Equal(got, []string{"a.example"}) {
		t.Fatalf("--no-default-hosts: %v", got)
	}
}
