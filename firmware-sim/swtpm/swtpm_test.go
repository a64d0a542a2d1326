package swtpm_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/attest"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
)

func TestNewManufacturer(t *testing.T) {
	dir := t.TempDir()
	m, err := swtpm.NewManufacturer(dir)
	if err != nil {
		t.Fatalf("NewManufacturer: %v", err)
	}
	if !m.RootCert().IsCA {
		t.Error("root certificate is not a CA")
	}
	if err := m.RootCert().CheckSignatureFrom(m.RootCert()); err != nil {
		t.Errorf("root is not self-signed: %v", err)
	}
	fi, err := os.Stat(filepath.Join(dir, "signkey.pem"))
	if err != nil {
		t.Fatalf("stat key: %v", err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("key file mode = %o, want 600", perm)
	}

	t.Run("A second manufacturer in the same directory is refused", func(t *testing.T) {
		if _, err := swtpm.NewManufacturer(dir); !errors.Is(err, swtpm.ErrManufacturerExists) {
			t.Fatalf("NewManufacturer again: err = %v, want ErrManufacturerExists", err)
		}
	})
	t.Run("Loading returns the same root", func(t *testing.T) {
		l, err := swtpm.LoadManufacturer(dir)
		if err != nil {
			t.Fatalf("LoadManufacturer: %v", err)
		}
		if !l.RootCert().Equal(m.RootCert()) || string(l.RootPEM()) != string(m.RootPEM()) {
			t.Error("loaded root differs")
		}
	})
	t.Run("Loading an empty directory fails", func(t *testing.T) {
		if _, err := swtpm.LoadManufacturer(t.TempDir()); !errors.Is(err, swtpm.ErrManufacturerInvalid) {
			t.Fatalf("err = %v, want ErrManufacturerInvalid", err)
		}
	})
}

// processGone reports whether no process with pid exists any more. Start
// reaps its child, so after Stop the PID is free.
func processGone(pid int) bool {
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

func TestStartStop(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	inst := swtpm.StartForTest(t, m)
	pid := inst.PID()
	if pid <= 0 {
		t.Fatalf("PID = %d", pid)
	}
	if processGone(pid) {
		t.Fatal("swtpm process is not running after Start")
	}
	conn, err := net.Dial("unix", inst.SocketPath())
	if err != nil {
		t.Fatalf("dial TPM socket: %v", err)
	}
	conn.Close()

	tpm := swtpm.OpenForTest(t, inst)
	eks, err := tpm.EKs()
	if err != nil {
		t.Fatalf("EKs: %v", err)
	}
	if len(eks) != 2 {
		t.Errorf("got %d EK certificates, want 2 (RSA and ECC)", len(eks))
	}
	for _, ek := range eks {
		if _, err := attest.VerifyEKCertificate(ek.CertDER, m.RootPool(), time.Now()); err != nil {
			t.Errorf("EK certificate at %#x does not verify against the manufacturer: %v", uint32(ek.NVIndex), err)
		}
	}

	if err := inst.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-inst.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	if !processGone(pid) {
		t.Errorf("process %d still exists after Stop", pid)
	}
	if err := inst.Stop(); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if _, err := os.Stat(inst.SocketPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket still present after Stop: %v", err)
	}
}

func TestStopReportsAnEarlyExit(t *testing.T) {
	swtpm.SkipIfNotInstalled(t)
	inst, err := swtpm.Start(t.Context(), swtpm.Options{Dir: t.TempDir(), Manufacturer: swtpm.ManufacturerForTest(t)})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { inst.Stop() })
	// Kill exactly our child, by its PID, to simulate a crash.
	if err := syscall.Kill(inst.PID(), syscall.SIGKILL); err != nil {
		t.Fatalf("kill: %v", err)
	}
	<-inst.Done()
	if err := inst.Stop(); err == nil {
		t.Error("Stop after a crash returned nil, want the exit status")
	}
}

func TestParallelInstances(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	const n = 3
	insts := make([]*swtpm.Instance, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { insts[i] = swtpm.StartForTest(t, m) })
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	pids := map[int]bool{}
	serials := map[string]bool{}
	for _, inst := range insts {
		pids[inst.PID()] = true
		ek, err := swtpm.OpenForTest(t, inst).EK()
		if err != nil {
			t.Fatalf("EK: %v", err)
		}
		serials[ek.Cert.SerialNumber.String()] = true
	}
	if len(pids) != n {
		t.Errorf("got %d distinct PIDs, want %d", len(pids), n)
	}
	if len(serials) != n {
		t.Errorf("got %d distinct EK certificate serials, want %d", len(serials), n)
	}
}

func TestRestartKeepsTheTPM(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	dir := t.TempDir()
	ekDER := func(inst *swtpm.Instance) string {
		tpm, err := tpmkey.Open(inst.SocketPath())
		if err != nil {
			t.Fatalf("tpmkey.Open: %v", err)
		}
		defer tpm.Close()
		ek, err := tpm.EK()
		if err != nil {
			t.Fatalf("EK: %v", err)
		}
		return string(ek.CertDER)
	}
	first := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir, Manufacturer: m})
	before := ekDER(first)
	if err := first.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	// No Manufacturer: the TPM in dir is already manufactured.
	second := swtpm.StartForTestOptions(t, swtpm.Options{Dir: dir})
	if ekDER(second) != before {
		t.Error("EK certificate changed across a restart")
	}
}

func TestStartErrors(t *testing.T) {
	swtpm.SkipIfNotInstalled(t)
	m := swtpm.ManufacturerForTest(t)
	tests := []struct {
		name  string
		setup func(t *testing.T) swtpm.Options
		want  error
		// wantOutput is text the tool printed that the error must carry.
		wantOutput string
	}{
		{
			name:  "Start without a directory is refused",
			setup: func(t *testing.T) swtpm.Options { return swtpm.Options{Manufacturer: m} },
			want:  swtpm.ErrInvalidOptions,
		},
		{
			name:  "Start of a new TPM without a manufacturer is refused",
			setup: func(t *testing.T) swtpm.Options { return swtpm.Options{Dir: t.TempDir()} },
			want:  swtpm.ErrInvalidOptions,
		},
		{
			name: "Manufacturing with a broken manufacturer key fails with swtpm_setup's output",
			setup: func(t *testing.T) swtpm.Options {
				broken := swtpm.ManufacturerForTest(t)
				if err := os.WriteFile(filepath.Join(broken.Dir(), "signkey.pem"), []byte("not a key\n"), 0o600); err != nil {
					t.Fatal(err)
				}
				return swtpm.Options{Dir: t.TempDir(), Manufacturer: broken}
			},
			want:       swtpm.ErrSetupFailed,
			wantOutput: "Could not import signing key",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst, err := swtpm.Start(t.Context(), tc.setup(t))
			if err == nil {
				inst.Stop()
				t.Fatal("Start succeeded")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.wantOutput) {
				t.Errorf("error does not carry the tool's output %q:\n%v", tc.wantOutput, err)
			}
		})
	}
}
