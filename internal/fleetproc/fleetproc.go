// Package fleetproc starts `fleetgate serve` as a child process, waits for
// the addresses it writes to its --addr-file, and stops exactly that
// process, by the handle it started, never by name.
//
// It is the one way the simulator (cmd/fleetsim), the benchmark harness
// (cmd/fleetbench) and the tests run a gateway process. It does not import
// testing: shipped commands use it. Tests use ForTest, which takes any
// value with the few methods of testing.TB it needs.
package fleetproc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Addrs are the addresses `fleetgate serve` bound, as it writes them to
// --addr-file (server.Addrs; a test keeps the two in step). A
// split process leaves out what it does not serve.
type Addrs struct {
	MQTT    string `json:"mqtt,omitempty"`
	API     string `json:"api,omitempty"`
	Metrics string `json:"metrics,omitempty"`
	WSS     string `json:"wss,omitempty"`
	Console string `json:"console,omitempty"`
	OCSP    string `json:"ocsp,omitempty"`
}

// ReadAddrs reads an address file. The gateway writes it whole (a rename),
// so a file that exists and parses is complete.
func ReadAddrs(path string) (Addrs, error) {
	var a Addrs
	b, err := os.ReadFile(path)
	if err != nil {
		return a, err
	}
	if len(b) == 0 {
		return a, fmt.Errorf("%s: empty", path)
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("%s: %w", path, err)
	}
	return a, nil
}

// ErrExited is returned by WaitAddrs when the process ended before writing
// its addresses.
var ErrExited = errors.New("exited before writing its address file")

// WaitAddrs polls path until it holds the addresses, the channel exited is
// closed (the gateway ended: ErrExited), ctx ends, or timeout passes. The
// gateway may run in this process (exited is then closed when its Run
// returns) or be a child process.
func WaitAddrs(ctx context.Context, path string, timeout time.Duration, exited <-chan struct{}) (Addrs, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		a, err := ReadAddrs(path)
		if err == nil {
			return a, nil
		}
		select {
		case <-exited:
			return Addrs{}, ErrExited
		case <-ctx.Done():
			return Addrs{}, ctx.Err()
		case <-deadline.C:
			return Addrs{}, fmt.Errorf("no address file within %s: %v", timeout, err)
		case <-tick.C:
		}
	}
}

// Options say how to start a process.
type Options struct {
	// Bin is the fleetgate binary.
	Bin string
	// DataDir is the gateway's data directory (created by `fleetgate init`).
	DataDir string
	// MQTTAddr and APIAddr default to 127.0.0.1:0; the metrics address is
	// always 127.0.0.1:0. Args are further serve flags; a flag given there
	// again wins over these.
	MQTTAddr, APIAddr string
	Args              []string
	// AddrFile is where the gateway writes its addresses (default: in a
	// temporary directory, removed once read).
	AddrFile string
	// Log receives the process's stdout and stderr. Nil: kept in memory,
	// see Proc.Log. An *os.File is handed to the child as it is; the caller
	// may close its own copy once Start returns.
	Log io.Writer
	// Timeout bounds the wait for the address file (default 30 s).
	Timeout time.Duration
	// DieWithParent has the kernel kill the process if this one dies
	// (Pdeathsig), so that it never outlives a killed harness.
	DieWithParent bool
}

// ServeArgs are the arguments of `fleetgate serve` for o.
func (o Options) ServeArgs(addrFile string) []string {
	mqtt, api := o.MQTTAddr, o.APIAddr
	if mqtt == "" {
		mqtt = "127.0.0.1:0"
	}
	if api == "" {
		api = "127.0.0.1:0"
	}
	return append([]string{"serve", "--data-dir", o.DataDir, "--mqtt-addr", mqtt, "--api-addr", api,
		"--metrics-addr", "127.0.0.1:0", "--addr-file", addrFile}, o.Args...)
}

// Proc is one process this package started.
type Proc struct {
	// Addrs are what the gateway bound (empty for a process started with
	// Spawn).
	Addrs Addrs
	// PID is the process's ID.
	PID int

	cmd  *exec.Cmd
	done chan struct{}
	err  error // of Wait; read after done is closed
	mem  *Buffer
}

// Spawn starts bin with args (any program: the harness also runs
// Mosquitto) and reaps it in the background. log and dieWithParent are as
// in Options.
func Spawn(bin string, args []string, log io.Writer, dieWithParent bool) (*Proc, error) {
	cmd := exec.Command(bin, args...)
	p := &Proc{cmd: cmd, done: make(chan struct{})}
	if log == nil {
		p.mem = &Buffer{}
		log = p.mem
	}
	cmd.Stdout, cmd.Stderr = log, log
	if dieWithParent {
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	p.PID = cmd.Process.Pid
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Start runs `fleetgate serve` as o says and waits until it has written
// its addresses. On any error the process is stopped before Start returns.
func Start(ctx context.Context, o Options) (*Proc, error) {
	addrFile := o.AddrFile
	if addrFile == "" {
		dir, err := os.MkdirTemp("", "fleetproc-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		addrFile = filepath.Join(dir, "addrs.json")
	} else {
		_ = os.Remove(addrFile) // a previous run's
	}
	timeout := o.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	p, err := Spawn(o.Bin, o.ServeArgs(addrFile), o.Log, o.DieWithParent)
	if err != nil {
		return nil, err
	}
	if p.Addrs, err = WaitAddrs(ctx, addrFile, timeout, p.done); err != nil {
		if errors.Is(err, ErrExited) {
			err = fmt.Errorf("fleetgate serve exited: %v", p.err)
		} else {
			_ = p.Stop(10 * time.Second)
			if ctx.Err() == nil {
				err = fmt.Errorf("fleetgate serve (pid %d): %w", p.PID, err)
			}
		}
		if p.mem != nil {
			err = fmt.Errorf("%w\n%s", err, p.mem.String())
		}
		return nil, err
	}
	return p, nil
}

// Done is closed once the process has ended and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits for the process to end and returns its exit error.
func (p *Proc) Wait() error {
	<-p.done
	return p.err
}

// Signal sends sig to the process, unless it has ended.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits up to grace for the process to end, then
// sends SIGKILL. It returns nil if the process had already ended, the exit
// error of a process that ended on SIGTERM (nil: status 0), or an error
// saying it had to be killed. Later calls return nil.
func (p *Proc) Stop(grace time.Duration) error {
	if p.Exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return p.err
	case <-time.After(grace):
	}
	if err := p.Kill(); err != nil {
		return err
	}
	return fmt.Errorf("pid %d did not stop on SIGTERM within %s; killed", p.PID, grace)
}

// Kill sends SIGKILL and waits (up to 5 s) until the process is reaped.
func (p *Proc) Kill() error {
	if p.Exited() {
		return nil
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(5 * time.Second):
		return fmt.Errorf("pid %d did not exit on SIGKILL", p.PID)
	}
}

// Log is what the process wrote, if Options.Log was nil ("" otherwise).
func (p *Proc) Log() string {
	if p.mem == nil {
		return ""
	}
	return p.mem.String()
}

// Buffer is a log sink that goroutines may write while others read it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *Buffer) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(b)
}

// String returns everything written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
