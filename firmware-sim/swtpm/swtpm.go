// Package swtpm runs software TPMs (swtpm) for tests and for the fleet
// simulator, and simulates a TPM manufacturer: a CA that signs the EK
// certificates swtpm_setup provisions into each simulated TPM.
//
// Every Instance is one swtpm process listening on a unix socket in its own
// directory. Instances are independent and may run in parallel. Nothing
// machine-wide is used: swtpm_setup gets its own configuration that points
// swtpm_localca at the Manufacturer's files.
//
// Known limitations: swtpm's state is not encrypted at rest (a real TPM's
// secrets never leave the chip; a simulated one's are in the state directory),
// and the process runs with the caller's privileges.
package swtpm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Defaults for Options.
const (
	DefaultStopGrace    = 5 * time.Second
	DefaultReadyTimeout = 15 * time.Second
)

// Binaries this package runs.
const (
	binSwtpm   = "swtpm"
	binSetup   = "swtpm_setup"
	binLocalca = "swtpm_localca"
)

// maxSocketPath keeps unix socket paths below the kernel's sun_path limit
// (108 bytes including the terminating NUL).
const maxSocketPath = 100

// pollInterval is how long Start waits between readiness probes.
const pollInterval = 5 * time.Millisecond

// maxOutput caps how much swtpm output is kept for error messages.
const maxOutput = 64 << 10

// Log keys.
const (
	logKeyPID  = "pid"
	logKeyDir  = "dir"
	logKeySock = "socket"
)

// Options configure Start.
type Options struct {
	// Dir holds the TPM state (Dir/state) and, if the path is short enough,
	// the sockets. It is created if needed. Starting again on a Dir whose
	// TPM was already manufactured restarts that TPM (a "reboot"): same
	// EK, same keys. Required. Must not contain a comma (swtpm's option
	// syntax).
	Dir string
	// Manufacturer signs the EK certificates. Required when Dir holds no
	// TPM yet; ignored otherwise.
	Manufacturer *Manufacturer
	// Log receives lifecycle events. Nil discards them.
	Log *slog.Logger
	// StopGrace is how long Stop waits after SIGTERM before SIGKILL.
	// Zero means DefaultStopGrace.
	StopGrace time.Duration
	// ReadyTimeout bounds how long Start waits for the socket to answer,
	// in addition to ctx. Zero means DefaultReadyTimeout.
	ReadyTimeout time.Duration
	// Provisioning is how a new TPM is manufactured (its EK
	// certificate). The zero value runs swtpm_setup.
	Provisioning Provisioning
}

// Instance is a running swtpm process. Its methods are safe for concurrent
// use.
type Instance struct {
	dir        string
	sock       string
	ctrl       string
	tmpSockDir string // removed on Stop; empty if the sockets live in dir
	log        *slog.Logger
	grace      time.Duration

	cmd     *exec.Cmd
	out     *cappedBuffer
	done    chan struct{} // closed once the process has been reaped
	waitMu  sync.Mutex
	waitErr error

	stopOnce sync.Once
	stopErr  error
}

// Installed reports whether the swtpm binaries this package needs are on
// PATH, and if not, which one is missing (wrapped ErrNotInstalled).
func Installed() error {
	for _, b := range []string{binSwtpm, binSetup, binLocalca} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("swtpm: look up %s: %w: %w", b, ErrNotInstalled, err)
		}
	}
	return nil
}

// Start manufactures a TPM in opts.Dir if there is none yet (swtpm_setup
// --tpm2 --create-ek-cert, EK certificates signed by opts.Manufacturer),
// then starts `swtpm socket` on a unix socket and waits until the TPM
// answers a command. ctx bounds the setup and the wait, not the lifetime of
// the process: call Stop.
func Start(ctx context.Context, opts Options) (*Instance, error) {
	if opts.Dir == "" {
		return nil, fmt.Errorf("swtpm: start: Dir is empty: %w", ErrInvalidOptions)
	}
	if err := Installed(); err != nil {
		return nil, err
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("swtpm: start: %w", err)
	}
	if strings.Contains(dir, ",") {
		return nil, fmt.Errorf("swtpm: start: Dir %q contains a comma: %w", dir, ErrInvalidOptions)
	}
	log := opts.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("swtpm: create dir: %w", err)
	}
	stateDir := filepath.Join(dir, "state")
	manufactured, err := isManufactured(stateDir)
	if err != nil {
		return nil, err
	}
	if !manufactured {
		if opts.Manufacturer == nil {
			return nil, fmt.Errorf("swtpm: start: %s holds no TPM and Manufacturer is nil: %w", dir, ErrInvalidOptions)
		}
		// What a crash left half made is made again.
		if err := os.RemoveAll(stateDir); err != nil {
			return nil, fmt.Errorf("swtpm: remove half-made state: %w", err)
		}
		switch opts.Provisioning {
		case ProvisionSwtpmSetup:
			err = manufacture(ctx, dir, stateDir, opts.Manufacturer)
		case ProvisionECC:
			// The TPM that was provisioned goes on running.
			inst, err := provisionECC(ctx, dir, stateDir, opts, log)
			if err == nil {
				log.Info("swtpm manufactured", logKeyDir, dir, "provisioning", opts.Provisioning)
			}
			return inst, err
		default:
			err = fmt.Errorf("swtpm: start: provisioning %d: %w", opts.Provisioning, ErrInvalidOptions)
		}
		if err != nil {
			return nil, err
		}
		log.Info("swtpm manufactured", logKeyDir, dir, "provisioning", opts.Provisioning)
	}

	// swtpm_setup runs its own swtpm on the state and does not wait for it
	// to exit; that process (no child of ours) may still hold the state
	// lock for a moment. Wait for the lock instead of racing it.
	if err := waitStateUnlocked(ctx, stateDir, opts.ReadyTimeout); err != nil {
		return nil, err
	}
	return launch(ctx, dir, stateDir, opts, log)
}

// launch starts `swtpm socket` on stateDir (sockets in dir, or in a short
// temporary directory) and waits until the TPM answers.
func launch(ctx context.Context, dir, stateDir string, opts Options, log *slog.Logger) (*Instance, error) {
	var err error
	inst := &Instance{
		dir:   dir,
		log:   log,
		grace: opts.StopGrace,
		out:   &cappedBuffer{max: maxOutput},
		done:  make(chan struct{}),
	}
	if inst.grace <= 0 {
		inst.grace = DefaultStopGrace
	}
	sockDir := dir
	if len(filepath.Join(dir, "swtpm.ctrl")) > maxSocketPath {
		// Test temp dirs can be long; keep the sockets short instead.
		sockDir, err = os.MkdirTemp("", "swtpm-")
		if err != nil {
			return nil, fmt.Errorf("swtpm: socket dir: %w", err)
		}
		inst.tmpSockDir = sockDir
	}
	inst.sock = filepath.Join(sockDir, "swtpm.sock")
	inst.ctrl = filepath.Join(sockDir, "swtpm.ctrl")
	for _, p := range []string{inst.sock, inst.ctrl} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			inst.cleanupFiles()
			return nil, fmt.Errorf("swtpm: remove stale socket: %w", err)
		}
	}

	inst.cmd = exec.Command(binSwtpm, "socket", "--tpm2",
		"--server", "type=unixio,path="+inst.sock,
		"--ctrl", "type=unixio,path="+inst.ctrl,
		"--tpmstate", "dir="+stateDir,
		"--flags", "not-need-init,startup-clear",
	)
	inst.cmd.Stdout = inst.out
	inst.cmd.Stderr = inst.out
	// If this process dies without calling Stop, the kernel kills swtpm.
	// (Pdeathsig fires when the creating OS thread exits; the Go runtime
	// only retires threads locked with LockOSThread, which we do not use.)
	inst.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := inst.cmd.Start(); err != nil {
		inst.cleanupFiles()
		return nil, fmt.Errorf("swtpm: start swtpm: %w", err)
	}
	go func() {
		err := inst.cmd.Wait()
		inst.waitMu.Lock()
		inst.waitErr = err
		inst.waitMu.Unlock()
		close(inst.done)
	}()
	log.Info("swtpm started", logKeyPID, inst.PID(), logKeySock, inst.sock)

	if err := inst.waitReady(ctx, opts.ReadyTimeout); err != nil {
		if stopErr := inst.Stop(); stopErr != nil {
			err = errors.Join(err, stopErr)
		}
		return nil, err
	}
	return inst, nil
}

// isManufactured reports whether stateDir holds a TPM 2 state file and
// is not being provisioned (provisionECC's marker).
func isManufactured(stateDir string) (bool, error) {
	_, err := os.Stat(filepath.Join(stateDir, "tpm2-00.permall"))
	if err == nil {
		if _, err := os.Stat(provisioningMarker(stateDir)); err == nil {
			return false, nil
		} else if !errors.Is(err, os.ErrNotExist) {
			return false, fmt.Errorf("swtpm: stat marker: %w", err)
		}
		return true, nil
	}
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return false, fmt.Errorf("swtpm: stat state: %w", err)
}

// manufacture runs swtpm_setup with a private configuration. On failure it
// removes the partial state so that a later Start can retry.
func manufacture(ctx context.Context, dir, stateDir string, m *Manufacturer) (err error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("swtpm: create state dir: %w", err)
	}
	tmpDir := filepath.Join(dir, "tmp")
	if err := os.MkdirAll(tmpDir, 0o700); err != nil {
		return fmt.Errorf("swtpm: create tmp dir: %w", err)
	}
	defer func() {
		os.RemoveAll(tmpDir)
		if err != nil {
			os.RemoveAll(stateDir)
		}
	}()
	localca, err := exec.LookPath(binLocalca)
	if err != nil {
		return fmt.Errorf("swtpm: look up %s: %w: %w", binLocalca, ErrNotInstalled, err)
	}
	// swtpm_setup.conf(5); create_certs_tool_config is swtpm-localca.conf(5).
	conf := fmt.Sprintf("create_certs_tool = %s\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n",
		localca, m.localcaConfig(), m.localcaOptions())
	confPath := filepath.Join(dir, "swtpm_setup.conf")
	if err := writeFileAtomic(confPath, []byte(conf), 0o600); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, binSetup,
		"--tpm2", "--create-ek-cert",
		"--tpmstate", stateDir,
		"--config", confPath,
		"--not-overwrite",
	)
	// swtpm_setup creates its scratch directories under TMPDIR; keep them
	// in our directory. XDG_CONFIG_HOME is pointed there too so that it
	// never reads or writes per-user swtpm configuration.
	cmd.Env = append(os.Environ(), "TMPDIR="+tmpDir, "XDG_CONFIG_HOME="+tmpDir)
	out := &cappedBuffer{max: maxOutput}
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("swtpm: swtpm_setup: %w: %w\n%s", ErrSetupFailed, err, strings.TrimSpace(out.String()))
	}
	ok, err := isManufactured(stateDir)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("swtpm: swtpm_setup wrote no TPM state: %w\n%s", ErrSetupFailed, strings.TrimSpace(out.String()))
	}
	return nil
}

// waitStateUnlocked polls until no process holds swtpm's fcntl write lock on
// stateDir/.lock (swtpm's dir backend takes it for its lifetime).
func waitStateUnlocked(ctx context.Context, stateDir string, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultReadyTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	path := filepath.Join(stateDir, ".lock")
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("swtpm: state %s locked by another process: %w: %w", stateDir, ErrNotReady, ctx.Err())
		case <-timer.C:
		}
		free, err := lockFree(path)
		if err != nil {
			return err
		}
		if free {
			return nil
		}
		timer.Reset(pollInterval)
	}
}

// lockFree tries to take and release the write lock on path.
func lockFree(path string) (bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("swtpm: open state lock: %w", err)
	}
	defer f.Close() // also releases our fcntl lock
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: io.SeekStart}
	err = syscall.FcntlFlock(f.Fd(), syscall.F_SETLK, &lk)
	if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("swtpm: probe state lock: %w", err)
	}
	return true, nil
}

// waitReady polls the server socket with TPM2_GetRandom until the TPM
// answers, the process exits, or the deadline passes.
func (i *Instance) waitReady(ctx context.Context, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = DefaultReadyTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	timer := time.NewTimer(0)
	defer timer.Stop()
	var lastErr error
	for {
		select {
		case <-i.done:
			return fmt.Errorf("swtpm: pid %d: %w: %v\n%s", i.PID(), ErrExited, i.exitErr(), strings.TrimSpace(i.out.String()))
		case <-ctx.Done():
			return fmt.Errorf("swtpm: pid %d: %w: %w (last probe: %v)\n%s", i.PID(), ErrNotReady, ctx.Err(), lastErr, strings.TrimSpace(i.out.String()))
		case <-timer.C:
		}
		if lastErr = probe(ctx, i.sock); lastErr == nil {
			return nil
		}
		timer.Reset(pollInterval)
	}
}

// getRandom8 is TPM2_GetRandom(8): tag TPM_ST_NO_SESSIONS, size 12,
// TPM_CC_GetRandom (Part 3, 16.1).
var getRandom8 = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}

// probe sends one TPM command and checks for a success response header.
func probe(ctx context.Context, sock string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(dl); err != nil {
			return err
		}
	}
	if _, err := conn.Write(getRandom8); err != nil {
		return err
	}
	var hdr [10]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return err
	}
	if rc := binary.BigEndian.Uint32(hdr[6:]); rc != 0 {
		return fmt.Errorf("TPM2_GetRandom: response code %#x", rc)
	}
	return nil
}

// SocketPath returns the path of the TPM command socket (for
// go-tpm's linuxudstpm transport).
func (i *Instance) SocketPath() string { return i.sock }

// ControlPath returns the path of swtpm's control socket.
func (i *Instance) ControlPath() string { return i.ctrl }

// Dir returns the instance directory (Options.Dir, absolute).
func (i *Instance) Dir() string { return i.dir }

// PID returns the process ID of the swtpm process.
func (i *Instance) PID() int { return i.cmd.Process.Pid }

// Done returns a channel that is closed once the swtpm process has exited
// and been reaped.
func (i *Instance) Done() <-chan struct{} { return i.done }

// Output returns what swtpm has written to stdout and stderr so far
// (capped).
func (i *Instance) Output() string { return i.out.String() }

func (i *Instance) exitErr() error {
	i.waitMu.Lock()
	defer i.waitMu.Unlock()
	return i.waitErr
}

// Stop sends SIGTERM to exactly this instance's process, waits up to the
// grace period, then sends SIGKILL, and waits until the process is reaped.
// It is idempotent: later calls return the first call's result. It reports
// an error only if the process had died on its own with a failure status.
func (i *Instance) Stop() error {
	i.stopOnce.Do(func() {
		i.stopErr = i.stop()
		i.cleanupFiles()
	})
	return i.stopErr
}

func (i *Instance) stop() error {
	select {
	case <-i.done:
		// Exited on its own before Stop: report how.
		if err := i.exitErr(); err != nil {
			return fmt.Errorf("swtpm: pid %d exited before Stop: %w", i.PID(), err)
		}
		return nil
	default:
	}
	// The process is not reaped until the Wait goroutine returns, so its
	// PID cannot have been reused: signalling by PID hits exactly it.
	if err := i.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("swtpm: SIGTERM pid %d: %w", i.PID(), err)
	}
	timer := time.NewTimer(i.grace)
	defer timer.Stop()
	select {
	case <-i.done:
	case <-timer.C:
		i.log.Warn("swtpm ignored SIGTERM, killing", logKeyPID, i.PID())
		if err := i.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			return fmt.Errorf("swtpm: SIGKILL pid %d: %w", i.PID(), err)
		}
		<-i.done
	}
	i.log.Info("swtpm stopped", logKeyPID, i.PID())
	return nil
}

func (i *Instance) cleanupFiles() {
	if i.tmpSockDir != "" {
		os.RemoveAll(i.tmpSockDir)
		return
	}
	os.Remove(i.sock)
	os.Remove(i.ctrl)
}

// cappedBuffer is a concurrency-safe writer that keeps the first max bytes.
type cappedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

func (b *cappedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if room := b.max - b.buf.Len(); room > 0 {
		if len(p) > room {
			b.buf.Write(p[:room])
		} else {
			b.buf.Write(p)
		}
	}
	return len(p), nil
}

func (b *cappedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
