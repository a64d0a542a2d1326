package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	sim "github.com/fleetgate/fleetgate/firmware-sim"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
)

// swtpmsUnder lists swtpm processes whose command line names dir: the
// ones a fleetsim run with --work-dir dir started.
func swtpmsUnder(dir string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmd, []byte(dir)) {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && strings.Contains(string(st), ") Z") {
			continue // a zombie waiting for its parent: not running
		}
		if strings.HasPrefix(filepath.Base(strings.SplitN(string(cmd), "\x00", 2)[0]), "swtpm") {
			out = append(out, pid)
		}
	}
	return out
}

// requireNoSwtpm fails if swtpms of dir still run, and stops exactly those.
func requireNoSwtpm(t *testing.T, dir string) {
	t.Helper()
	var left []int
	deadline := time.Now().Add(10 * time.Second)
	for {
		if left = swtpmsUnder(dir); len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, pid := range left {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	t.Fatalf("swtpm processes left behind: %v", left)
}

func TestFleetsimScenarios(t *testing.T) {
	swtpm.SkipIfNotInstalled(t)
	for _, sc := range []string{sim.ScenarioSteady, sim.ScenarioRevoke, sim.ScenarioRestart, sim.ScenarioRenew, sim.ScenarioStorm} {
		t.Run(sc, func(t *testing.T) {
			work := t.TempDir()
			jsonOut := filepath.Join(work, "report.json")
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin(t, "fleetsim"), "run", "--spawn", "--fleetgate", bin(t, "fleetgate"),
				"--devices", "3", "--scenario", sc, "--cert-ttl", "12s", "--work-dir", work, "--json", jsonOut)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("fleetsim %s: %v\n%s", sc, err, out)
			}
			var rep sim.Report
			b, err := os.ReadFile(jsonOut)
			if err != nil || json.Unmarshal(b, &rep) != nil {
				t.Fatalf("no JSON report: %v\n%s", err, out)
			}
			if !rep.OK() || rep.Scenario != sc || rep.TPM != "swtpm" || rep.Connected != 3 {
				t.Fatalf("report %+v\n%s", rep, out)
			}
			if rep.Lost != 0 || rep.Sent == 0 {
				t.Fatalf("sent %d, lost %d", rep.Sent, rep.Lost)
			}
			requireNoSwtpm(t, work)
		})
	}
}

func TestFleetsimStopsItsSwtpmsOnInterruptAndOnFailure(t *testing.T) {
	swtpm.SkipIfNotInstalled(t)
	t.Run("SIGINT mid-run", func(t *testing.T) {
		work := t.TempDir()
		cmd := exec.Command(bin(t, "fleetsim"), "run", "--spawn", "--fleetgate", bin(t, "fleetgate"), "--devices", "4",
			"--scenario", "steady", "--messages", "100000", "--interval", "10ms", "--work-dir", work)
		stdout, _ := cmd.StdoutPipe()
		cmd.Stderr = cmd.Stdout
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if strings.Contains(sc.Text(), "enrolled (TPM attestation)") { // its swtpms run
					break
				}
			}
			_ = cmd.Process.Signal(os.Interrupt)
			for sc.Scan() {
			}
			done <- cmd.Wait()
		}()
		select {
		case err := <-done:
			if err == nil {
				t.Fatal("fleetsim exited 0 after SIGINT mid-run")
			}
		case <-time.After(60 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatal("fleetsim did not exit after SIGINT")
		}
		requireNoSwtpm(t, work)
	})
	t.Run("enrollment fails", func(t *testing.T) {
		work := t.TempDir()
		// Unregistered EKs: the allowlist policy refuses every enrollment.
		out, err := exec.Command(bin(t, "fleetsim"), "run", "--spawn", "--fleetgate", bin(t, "fleetgate"), "--devices", "2",
			"--register=false", "--work-dir", work).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "ek_not_registered") {
			t.Fatalf("fleetsim with unregistered EKs: %v\n%s", err, out)
		}
		requireNoSwtpm(t, work)
	})
}
