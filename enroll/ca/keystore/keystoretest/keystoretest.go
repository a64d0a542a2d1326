// Package keystoretest starts the key stores of enroll/ca/keystore for
// tests: a SoftHSM2 token in the test's temp dir and a swtpm. Each stops or
// removes what it started when the test ends.
package keystoretest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
)

// SoftHSMModule is Debian's SoftHSM2 PKCS#11 module (package softhsm2).
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// RequireEnv turns a missing SoftHSM2 or openssl from a skip into a
// failure (make test sets it), as FLEETGATE_REQUIRE_SOFTHSM does.
const RequireEnv = "FLEETGATE_REQUIRE_TOOLS"

func required() bool {
	return os.Getenv(RequireEnv) != "" || os.Getenv("FLEETGATE_REQUIRE_SOFTHSM") != ""
}

// OpenSSL skips t without the openssl command (fails it under RequireEnv).
func OpenSSL(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		if required() {
			t.Fatalf("openssl is not installed (and %s is set)", RequireEnv)
		}
		t.Skip("openssl is not installed")
	}
}

// Token is an initialised SoftHSM2 token.
type Token struct {
	Module, Label, PIN, ConfPath string
}

// URI returns a pkcs11: URI for the key object on the token.
func (tk Token) URI(object string) string {
	return fmt.Sprintf("pkcs11:token=%s;object=%s?module-path=%s&pin-value=%s", tk.Label, object, tk.Module, tk.PIN)
}

// SoftHSM initialises a fresh token in t.TempDir() and points SOFTHSM2_CONF
// at it for the rest of the test (t.Setenv: the test must not be parallel).
// SoftHSM2 reads SOFTHSM2_CONF when the module is initialised, which
// crypto11 does when the first context of a process opens it after the
// last one closed: close every key before the test ends.
func SoftHSM(t testing.TB, label string) Token {
	t.Helper()
	util, err := exec.LookPath("softhsm2-util")
	if err != nil || fileMissing(SoftHSMModule) {
		if required() {
			t.Fatalf("SoftHSM2 is not installed (and %s is set)", RequireEnv)
		}
		t.Skipf("SoftHSM2 is not installed (apt-get install softhsm2); set %s=1 to fail instead", RequireEnv)
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	body := "directories.tokendir = " + tokens + "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	tk := Token{Module: SoftHSMModule, Label: label, PIN: "4711-pin", ConfPath: conf}
	out, err := exec.Command(util, "--init-token", "--free", "--label", label, "--pin", tk.PIN, "--so-pin", "so-4711").CombinedOutput()
	if err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	return tk
}

// TPM starts a swtpm for the test and returns its socket path (a device
// for "tpm:device=").
func TPM(t testing.TB) string {
	t.Helper()
	inst := swtpm.StartForTest(t, swtpm.ManufacturerForTest(t))
	return inst.SocketPath()
}

func fileMissing(p string) bool { _, err := os.Stat(p); return err != nil }
