// Package cluster holds the end-to-end tests of a fleetgate cluster (issue
// 13, docs/cluster.md): in-process nodes and `fleetgate serve` processes
// on loopback, each stopped by handle or PID. A package of its own, so
// that `go test ./...` runs it beside the other e2e tests.
package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
	// extraBinDirs are further binaries built for the tests (nats-server).
	extraBinDirs []string
)

// bin builds fleetgate once per test binary run and returns its path.
func bin(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "fleetgate-cluster-bin-")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir, "../../cmd/fleetgate").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "fleetgate")
}

// server is a `fleetgate serve` process this test started.
type server = fleetproc.Proc

// serve starts `fleetgate serve` on loopback ports and waits until it
// listens; it is stopped by PID when the test ends.
func serve(t testing.TB, dataDir string, extra ...string) *server {
	t.Helper()
	return fleetproc.ForTest(t, fleetproc.Options{Bin: bin(t), DataDir: dataDir, Args: extra})
}

// kill sends SIGKILL to exactly this process and reaps it.
func kill(t testing.TB, s *server) {
	t.Helper()
	if err := s.Kill(); err != nil {
		t.Error(err)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range append(extraBinDirs, binDir) {
		if d != "" {
			os.RemoveAll(d)
		}
	}
	os.Exit(code)
}
