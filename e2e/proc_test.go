package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
	fgserver "github.com/fleetgate/fleetgate/server"
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
type server struct {
	cmd   *exec.Cmd
	log   *lockedBuf
	addrs fgserver.Addrs
	done  chan error
}

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// serve starts `fleetgate serve` on loopback ports and waits until it
// listens. The process is stopped by PID when the test ends.
func serve(t testing.TB, dataDir string, extra ...string) *server {
	t.Helper()
	addrFile := filepath.Join(t.TempDir(), "addrs.json")
	args := append([]string{"serve", "--data-dir", dataDir, "--mqtt-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0",
		"--metrics-addr", "127.0.0.1:0", "--addr-file", addrFile}, extra...)
	cmd := exec.Command(bin(t, "fleetgate"), args...)
	lb := &lockedBuf{}
	cmd.Stdout, cmd.Stderr = lb, lb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &server{cmd: cmd, log: lb, done: make(chan error, 1)}
	go func() { s.done <- cmd.Wait() }()
	t.Cleanup(func() { s.stop(t) })
	testenv.Eventually(t, 30*time.Second, func() error {
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("fleetgate serve exited: %v\n%s", err, lb.String())
		default:
		}
		b, err := os.ReadFile(addrFile)
		if err != nil {
			return err
		}
		return json.Unmarshal(b, &s.addrs)
	})
	return s
}

// stop sends SIGTERM to exactly this process, and SIGKILL if it has not
// exited after 10 s. Idempotent.
func (s *server) stop(t testing.TB) {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		s.done <- err
		if err != nil {
			t.Errorf("fleetgate serve exited with %v after SIGTERM", err)
		}
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		err := <-s.done
		s.done <- err
		t.Errorf("fleetgate serve did not stop on SIGTERM within 10s")
	}
}

// kill sends SIGKILL to exactly this process and reaps it.
func (s *server) kill(t testing.TB) {
	if s.cmd.ProcessState != nil {
		return
	}
	_ = s.cmd.Process.Kill()
	err := <-s.done
	s.done <- err
}
