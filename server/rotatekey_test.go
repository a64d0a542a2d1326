package server_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore"
	"github.com/fleetgate/fleetgate/enroll/ca/keystore/keystoretest"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// TestRotationKeepsTheKeyStore: with the issuing CA key in SoftHSM2 or a
// swtpm, `ca rotate` creates the next issuing key in the same store (no
// key file, no PIN in the data directory); devices enroll under the new
// CA, a restart opens the rotated key from the store, and `server-cert
// renew` signs with it through ca_key from the config file.
func TestRotationKeepsTheKeyStore(t *testing.T) {
	for _, store := range []string{"pkcs11", "tpm"} {
		t.Run(store, func(t *testing.T) {
			var ref, want string
			if store == "pkcs11" {
				ref, want = keystoretest.SoftHSM(t, "fleetgate").URI("issuing"), "pkcs11:object=issuing-"
			} else {
				ref, want = "tpm:handle=0x81000140;device="+keystoretest.TPM(t), "tpm:handle=0x81000141"
			}
			dir := initWithKey(t, ref)
			cfg := testenv.Config(t, testenv.Options{DataDir: dir})
			cfg.CAKey = ref
			g := testenv.StartConfig(t, cfg)
			ctx := context.Background()
			rot, err := g.Admin.CARotate(ctx)
			if err != nil {
				t.Fatal(err)
			}
			keys, _ := filepath.Glob(filepath.Join(dir, "ca", "*.key"))
			for _, k := range keys {
				if filepath.Base(k) != "root.key" {
					t.Fatalf("rotation wrote a key file %s although ca_key is in %s", k, store)
				}
			}
			list, err := os.ReadFile(filepath.Join(dir, ca.IssuersFile))
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(list), "4711-pin") || strings.Contains(string(list), "module-path") {
				t.Fatalf("the issuer list holds the store's secrets: %s", list)
			}
			if !strings.Contains(string(list), want) {
				t.Fatalf("the issuer list does not record the new key as %s…: %s", want, list)
			}
			rotated := func() *x509.Certificate {
				t.Helper()
				a, err := ca.Load(dir, ca.Options{NoKeys: true})
				if err != nil {
					t.Fatal(err)
				}
				if a.Current().ID != rot.Issuer.ID {
					t.Fatalf("current issuing CA %s, want the rotated %s", a.Current().ID, rot.Issuer.ID)
				}
				return a.Current().Cert
			}
			enrolled := func(g *testenv.Gateway, id string) {
				t.Helper()
				leaf := g.EnrollDevice(t, id, "g").Leaf()
				if err := leaf.CheckSignatureFrom(rotated()); err != nil {
					t.Fatalf("%s is not signed by the rotated CA: %v", id, err)
				}
			}
			enrolled(g, "after-rotation")
			g.Stop()

			// A restart opens the rotated key from the store.
			g = testenv.StartConfig(t, cfg)
			enrolled(g, "after-restart")
			g.Stop()

			// server-cert renew finds the key through the config's ca_key.
			conf := filepath.Join(t.TempDir(), "fleetgate.yaml")
			if err := os.WriteFile(conf, []byte(fmt.Sprintf("ca_key: %q\n", ref)), 0o600); err != nil {
				t.Fatal(err)
			}
			caKey, err := server.ConfiguredCAKey(conf, func(string) string { return "" })
			if err != nil || caKey != ref {
				t.Fatalf("ca_key from the config: %q %v", keystore.Redact(caKey), err)
			}
			if _, err := server.RenewServerCert(dir, "", []string{"localhost"}); err == nil {
				t.Fatal("server-cert renew without the key store signed with a key it should not have")
			}
			srv, err := server.RenewServerCert(dir, caKey, []string{"localhost", "127.0.0.1"})
			if err != nil {
				t.Fatalf("server-cert renew with the key in %s: %v", store, err)
			}
			if srv.CheckSignatureFrom(rotated()) != nil {
				t.Fatal("the renewed server certificate is not signed by the rotated CA")
			}
			if _, err := server.RenewOperatorCert(dir, caKey); err != nil {
				t.Fatalf("operator certificate renew with the key in %s: %v", store, err)
			}
		})
	}
}
