package sim

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// gatewayProc is a `fleetgate serve` process fleetsim started itself
// (--spawn), so that scenarios can restart it. It is stopped by PID.
type gatewayProc struct {
	bin, dataDir, logFile string
	extra                 []string
	proc                  *fleetproc.Proc
}

func startGateway(ctx context.Context, bin, workDir string, extra []string) (*gatewayProc, error) {
	g := &gatewayProc{bin: bin, dataDir: filepath.Join(workDir, "gateway"), logFile: filepath.Join(workDir, "gateway.log"), extra: extra}
	if out, err := exec.CommandContext(ctx, bin, "init", "--data-dir", g.dataDir).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("fleetgate init: %v: %s", err, out)
	}
	if err := g.start(ctx, "", ""); err != nil {
		return nil, err
	}
	return g, nil
}

// start runs `fleetgate serve` on mqttAddr and apiAddr (empty: loopback
// ports the kernel chooses), its output appended to the log file.
func (g *gatewayProc) start(ctx context.Context, mqttAddr, apiAddr string) error {
	logf, err := os.OpenFile(g.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	p, err := fleetproc.Start(ctx, fleetproc.Options{Bin: g.bin, DataDir: g.dataDir, MQTTAddr: mqttAddr, APIAddr: apiAddr,
		Args: g.extra, AddrFile: filepath.Join(g.dataDir, "addrs.json"), Log: logf})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w (log: %s)", err, g.logFile)
	}
	g.proc = p
	return nil
}

// addrs are the running gateway's addresses.
func (g *gatewayProc) addrs() fleetproc.Addrs { return g.proc.Addrs }

// pid is the running gateway's process ID.
func (g *gatewayProc) pid() int { return g.proc.PID }

// stop sends SIGTERM to the process this fleetsim started, then SIGKILL
// after 10 s.
func (g *gatewayProc) stop() {
	if g.proc != nil {
		_ = g.proc.Stop(10 * time.Second)
	}
}

// restart stops the gateway and starts it again on the same addresses.
func (g *gatewayProc) restart(ctx context.Context) error {
	a := g.addrs()
	g.stop()
	return g.start(ctx, a.MQTT, a.API)
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
