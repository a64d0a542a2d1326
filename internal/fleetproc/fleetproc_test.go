package fleetproc_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
	"github.com/fleetgate/fleetgate/server"
)

// fake writes a stand-in for `fleetgate serve`: a shell script that reads
// --addr-file and --mqtt-addr from its arguments, then runs body.
func fake(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "fleetgate")
	script := `#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in
    --addr-file) addr="$2"; shift ;;
    --mqtt-addr) mqtt="$2"; shift ;;
  esac
  shift
done
` + body
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

const serves = `echo "serving on $mqtt"
printf '{"mqtt":"%s","api":"127.0.0.1:2","metrics":"127.0.0.1:3"}' "$mqtt" > "$addr.tmp" && mv "$addr.tmp" "$addr"
exec sleep 60
`

// servesCleanly is serves, exiting 0 on SIGTERM as fleetgate does. The
// trap is set before the address file is written: a test may stop the
// process as soon as the file is there.
var servesCleanly = "trap 'kill $! 2>/dev/null; exit 0' TERM\n" + strings.Replace(serves, "exec sleep 60", "sleep 60 &\nwait", 1)

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func TestAddrsMatchTheGatewaysFile(t *testing.T) {
	in := server.Addrs{MQTT: "127.0.0.1:1", API: "127.0.0.1:2", Metrics: "127.0.0.1:3"}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "addrs.json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := fleetproc.ReadAddrs(p)
	if err != nil || server.Addrs(got) != in {
		t.Fatalf("ReadAddrs = %+v, %v; want %+v", got, err, in)
	}
}

func TestStartStop(t *testing.T) {
	p := fleetproc.ForTest(t, fleetproc.Options{Bin: fake(t, serves), DataDir: t.TempDir(), MQTTAddr: "127.0.0.1:1883"})
	if p.Addrs.MQTT != "127.0.0.1:1883" || p.Addrs.API != "127.0.0.1:2" {
		t.Fatalf("addrs %+v", p.Addrs)
	}
	if !strings.Contains(p.Log(), "serving on 127.0.0.1:1883") {
		t.Fatalf("log %q", p.Log())
	}
	if err := p.Stop(5 * time.Second); err == nil {
		t.Fatal("a shell killed by SIGTERM exits with an error status")
	}
	if !p.Exited() || alive(p.PID) {
		t.Fatal("still running after Stop")
	}
	if err := p.Stop(time.Second); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}

func TestStopKillsWhatIgnoresSIGTERM(t *testing.T) {
	p, err := fleetproc.Start(context.Background(), fleetproc.Options{Bin: fake(t, "trap '' TERM\n"+strings.Replace(serves, "exec sleep 60", "while :; do sleep 1; done", 1)), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(300 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("Stop = %v, want killed", err)
	}
	if alive(p.PID) {
		t.Fatal("still running")
	}
}

func TestStartReportsAnEarlyExit(t *testing.T) {
	_, err := fleetproc.Start(context.Background(), fleetproc.Options{Bin: fake(t, "echo no data dir >&2; exit 3\n"), DataDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "no data dir") {
		t.Fatalf("Start = %v", err)
	}
}

func TestStartStopsTheProcessWhenItGivesUp(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	bin := fake(t, "echo $$ > "+pidFile+"\nexec sleep 60\n") // never writes its addresses
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := fleetproc.Start(ctx, fleetproc.Options{Bin: bin, DataDir: t.TempDir()})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v", err)
	}
	_, err = fleetproc.Start(context.Background(), fleetproc.Options{Bin: bin, DataDir: t.TempDir(), Timeout: 300 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "no address file") {
		t.Fatalf("Start = %v", err)
	}
	b, _ := os.ReadFile(pidFile)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid == 0 {
		t.Fatalf("pid file %q", b)
	}
	if alive(pid) {
		t.Fatalf("pid %d still running", pid)
	}
}

func TestProcFigures(t *testing.T) {
	p := fleetproc.ForTest(t, fleetproc.Options{Bin: fake(t, servesCleanly), DataDir: t.TempDir()})
	if rss, err := fleetproc.RSS(p.PID); err != nil || rss <= 0 {
		t.Errorf("RSS = %d, %v", rss, err)
	}
	if cpu, err := fleetproc.CPUTime(p.PID); err != nil || cpu < 0 {
		t.Errorf("CPUTime = %s, %v", cpu, err)
	}
	if _, err := fleetproc.RSS(-1); err == nil {
		t.Error("RSS of no process: no error")
	}
}
