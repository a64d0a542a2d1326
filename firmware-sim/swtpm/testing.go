package swtpm

import (
	"context"
	"os"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
)

// TB is the part of testing.TB the helpers below use. The package does not
// import testing: fleetsim and fleetbench, which ship, link it.
type TB interface {
	Helper()
	Cleanup(func())
	TempDir() string
	Context() context.Context
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
}

// RequireEnv names the environment variable that turns a missing swtpm
// installation from a skipped test into a failed one (set it in CI).
const RequireEnv = "FLEETGATE_REQUIRE_SWTPM"

// StartForTest starts a fresh swtpm manufactured by m in a test temp dir and
// stops exactly that process in t.Cleanup, also when the test fails. If the
// swtpm binaries are missing it skips the test, unless FLEETGATE_REQUIRE_SWTPM
// is set, in which case it fails it.
func StartForTest(t TB, m *Manufacturer) *Instance {
	t.Helper()
	return StartForTestOptions(t, Options{Dir: t.TempDir(), Manufacturer: m})
}

// StartForTestOptions is StartForTest with explicit Options, e.g. to restart
// a TPM on an existing Dir.
func StartForTestOptions(t TB, opts Options) *Instance {
	t.Helper()
	SkipIfNotInstalled(t)
	inst, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatalf("swtpm.Start: %v", err)
	}
	t.Cleanup(func() {
		if err := inst.Stop(); err != nil {
			t.Errorf("swtpm.Stop: %v", err)
		}
	})
	return inst
}

// OpenForTest opens inst's TPM with tpmkey and closes it when the test
// ends (before the swtpm of StartForTest is stopped).
func OpenForTest(t TB, inst *Instance) *tpmkey.TPM {
	t.Helper()
	tpm, err := tpmkey.Open(inst.SocketPath())
	if err != nil {
		t.Fatalf("tpmkey.Open: %v", err)
	}
	t.Cleanup(func() { tpm.Close() })
	return tpm
}

// DeviceForTest is a simulated device's TPM: a fresh swtpm manufactured by
// m (StartForTest), opened with tpmkey (OpenForTest). Both end with the
// test.
func DeviceForTest(t TB, m *Manufacturer) (*Instance, *tpmkey.TPM) {
	t.Helper()
	inst := StartForTest(t, m)
	return inst, OpenForTest(t, inst)
}

// ManufacturerForTest creates a Manufacturer in a test temp dir.
func ManufacturerForTest(t TB) *Manufacturer {
	t.Helper()
	m, err := NewManufacturer(t.TempDir())
	if err != nil {
		t.Fatalf("swtpm.NewManufacturer: %v", err)
	}
	return m
}

// SkipIfNotInstalled skips t when the swtpm binaries are missing, or fails
// it if FLEETGATE_REQUIRE_SWTPM is set.
func SkipIfNotInstalled(t TB) {
	t.Helper()
	if err := Installed(); err != nil {
		if os.Getenv(RequireEnv) != "" {
			t.Fatalf("%v (and %s is set)", err, RequireEnv)
		}
		t.Skipf("%v; install swtpm and swtpm-tools, or set %s=1 to fail instead of skipping", err, RequireEnv)
	}
}
