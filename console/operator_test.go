package console_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/operator/client"
)

// readOnlyOperator adds operator name with role read-only through the
// admin API and returns an admin API client with its certificate.
func readOnlyOperator(t *testing.T, e *env, name string) *client.Client {
	t.Helper()
	r, err := e.g.Admin.AddOperator(context.Background(), api.OperatorAddRequest{Name: name, Role: api.OperatorReadOnly})
	if err != nil {
		t.Fatalf("add operator %s: %v", name, err)
	}
	dir := t.TempDir()
	files := map[string]string{"cert.pem": r.CertificateChainPEM, "key.pem": r.PrivateKeyPEM, "ca.pem": r.CACertificatesPEM}
	for f, pem := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(pem), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	c, err := client.New(e.g.URL(), client.Credentials{CertFile: filepath.Join(dir, "cert.pem"), KeyFile: filepath.Join(dir, "key.pem"), CAFile: filepath.Join(dir, "ca.pem")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}
