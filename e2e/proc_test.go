package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// bin builds the command once per test binary run and returns its path.
func bin(t testing.TB, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "fleetgate-e2e-bin-")
		if buildErr != nil {
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir, "../cmd/fleetgate", "../cmd/fleetsim").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, name)
}

// run runs a command to completion and returns its combined output.
func run(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// server is a `fleetgate serve` process this test started.
type server = fleetproc.Proc

// serve starts `fleetgate serve` on loopback ports and waits until it
// listens. The process is stopped by PID when the test ends.
func serve(t testing.TB, dataDir string, extra ...string) *server {
	t.Helper()
	return fleetproc.ForTest(t, fleetproc.Options{Bin: bin(t, "fleetgate"), DataDir: dataDir, Args: extra})
}

// stop sends SIGTERM to exactly this process, and SIGKILL if it has not
// exited after 10 s; the test fails unless it exits cleanly. Idempotent.
func stop(t testing.TB, s *server) {
	t.Helper()
	fleetproc.StopForTest(t, s)
}

// kill sends SIGKILL to exactly this process and reaps it.
func kill(t testing.TB, s *server) {
	t.Helper()
	if err := s.Kill(); err != nil {
		t.Error(err)
	}
}
