package sim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// gatewayProc is a `fleetgate serve` process fleetsim started itself
// (--spawn), so that scenarios can restart it. It is stopped by PID.
type gatewayProc struct {
	bin, dataDir, logFile string
	extra                 []string
	addrs                 struct{ MQTT, API, Metrics string }
	cmd                   *exec.Cmd
	done                  chan error
}

func startGateway(ctx context.Context, bin, workDir string, extra []string) (*gatewayProc, error) {
	g := &gatewayProc{bin: bin, dataDir: filepath.Join(workDir, "gateway"), logFile: filepath.Join(workDir, "gateway.log"), extra: extra}
	if out, err := exec.CommandContext(ctx, bin, "init", "--data-dir", g.dataDir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("fleetgate init: %v: %s", err, out)
	}
	if err := g.start(ctx, "127.0.0.1:0", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *gatewayProc) start(ctx context.Context, mqttAddr, apiAddr string) error {
	addrFile := filepath.Join(g.dataDir, "addrs.json")
	_ = os.Remove(addrFile)
	logf, err := os.OpenFile(g.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := append([]string{"serve", "--data-dir", g.dataDir, "--mqtt-addr", mqttAddr, "--api-addr", apiAddr,
		"--metrics-addr", "127.0.0.1:0", "--addr-file", addrFile}, g.extra...)
	g.cmd = exec.Command(g.bin, args...)
	g.cmd.Stdout, g.cmd.Stderr = logf, logf
	if err := g.cmd.Start(); err != nil {
		return fmt.Errorf("start fleetgate serve: %w", err)
	}
	g.done = make(chan error, 1)
	go func(c *exec.Cmd, done chan error) { done <- c.Wait() }(g.cmd, g.done)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(addrFile); err == nil && json.Unmarshal(b, &g.addrs) == nil {
			return nil
		}
		select {
		case err := <-g.done:
			g.done <- err
			return fmt.Errorf("fleetgate serve exited: %v (log: %s)", err, g.logFile)
		case <-ctx.Done():
			g.stop()
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			g.stop()
			return errors.New("fleetgate serve did not start within 30s")
		}
	}
}

// stop sends SIGTERM to the process this fleetsim started, then SIGKILL
// after 10 s.
func (g *gatewayProc) stop() {
	if g.cmd == nil || g.cmd.Process == nil {
		return
	}
	select {
	case err := <-g.done:
		g.done <- err
		return
	default:
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-g.done:
		g.done <- err
	case <-time.After(10 * time.Second):
		_ = g.cmd.Process.Kill()
		err := <-g.done
		g.done <- err
	}
}

// restart stops the gateway and starts it again on the same addresses.
func (g *gatewayProc) restart(ctx context.Context) error {
	mqtt, api := g.addrs.MQTT, g.addrs.API
	g.stop()
	return g.start(ctx, mqtt, api)
}

// findFleetgate returns the fleetgate binary: next to this executable, or
// on PATH.
func findFleetgate() (string, error) {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "fleetgate")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return exec.LookPath("fleetgate")
}
