// Command fleetgate-device is the device agent for devices whose MQTT client
// is not written in Go (mosquitto, paho C, Node, ...): it enrolls the device
// (bootstrap token or TPM), keeps its certificate files in a directory any
// MQTT client can read, renews the certificate at 2/3 of its life with
// jitter, and restarts or signals the client after each renewal — as
// `step ca renew --daemon` does for step-ca.
//
//	fleetgate-device enroll --server URL --ca root.crt --device ID --token TOKEN [--dir DIR]
//	fleetgate-device enroll --server URL --ca root.crt --tpm /dev/tpmrm0 [--device ID] [--dir DIR]
//	fleetgate-device renew [--daemon] [--pid-file F --signal HUP] [--dir DIR]
//	fleetgate-device run [--signal HUP] [--dir DIR] -- CLIENT [ARGS...]
//
// Files in DIR (default /var/lib/fleetgate-device): cert.pem (certificate +
// issuing CA), ca.pem (roots for the broker), device.key (software key,
// 0600; none in TPM mode: the key stays in the TPM, whose key blobs are
// tls.pub/tls.priv), agent.json (server, device ID, TPM path). Every file
// is written to a temporary file and renamed.
//
// Build static: CGO_ENABLED=0 go build ./cmd/fleetgate-device
package main

import (
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/internal/atomicfile"
)

// DefaultDir is the agent's directory when --dir is not given.
const DefaultDir = "/var/lib/fleetgate-device"

// DefaultTPM is the TPM used by --tpm without a path: the kernel's resource
// manager.
const DefaultTPM = "/dev/tpmrm0"

// StateFile records what enroll was given, for renew and run.
const StateFile = "agent.json"

// state is agent.json.
type state struct {
	Server   string `json:"server"`
	DeviceID string `json:"device_id"`
	// TPM is the TPM's path; empty for a software key.
	TPM string `json:"tpm,omitempty"`
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage:
  fleetgate-device enroll --server URL --ca ROOT.pem --device ID --token TOKEN [--dir DIR]
  fleetgate-device enroll --server URL --ca ROOT.pem --tpm /dev/tpmrm0 [--device ID] [--dir DIR]
  fleetgate-device renew  [--daemon] [--pid-file FILE --signal SIG] [--dir DIR]
  fleetgate-device run    [--signal SIG] [--dir DIR] -- CLIENT [ARGS...]
`

// run is main without os.Exit: 0 ok, 1 failure, 2 usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	var err error
	switch args[0] {
	case "enroll":
		err = enrollCmd(ctx, args[1:], stdout)
	case "renew":
		err = renewCmd(ctx, args[1:], stdout, log)
	case "run":
		err = runCmd(ctx, args[1:], log)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = usageError{fmt.Errorf("unknown command %q", args[0])}
	}
	var ue usageError
	var ce clientExit
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "fleetgate-device: %v\n%s", err, usage)
		return 2
	case errors.As(err, &ce):
		return int(ce)
	case errors.Is(err, context.Canceled):
		return 0
	default:
		fmt.Fprintln(stderr, "fleetgate-device:", err)
		return 1
	}
}

type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }

// clientExit is the exit status of run's client, passed on.
type clientExit int

func (c clientExit) Error() string { return "client exited with status " + strconv.Itoa(int(c)) }

func newFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("dir", envOr("FLEETGATE_DEVICE_DIR", DefaultDir), "directory of the certificate, key and state files (env FLEETGATE_DEVICE_DIR)")
	return fs, dir
}

func parse(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	return nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func enrollCmd(ctx context.Context, args []string, stdout io.Writer) error {
	fs, dir := newFlags("enroll")
	srv := fs.String("server", os.Getenv("FLEETGATE_SERVER"), "enrollment API URL, e.g. https://gateway.example.com:8443 (env FLEETGATE_SERVER)")
	caFile := fs.String("ca", "", "root CA certificate (PEM) that the server's certificate chains to")
	id := fs.String("device", "", "device ID (required with --token; with --tpm the EK's automatic ID by default)")
	token := fs.String("token", os.Getenv("FLEETGATE_TOKEN"), "bootstrap token (env FLEETGATE_TOKEN)")
	tpmPath := fs.String("tpm", "", "enroll by TPM attestation with the TPM at this path ("+DefaultTPM+", or a swtpm socket); the key stays in the TPM")
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return usageError{fmt.Errorf("enroll: stray argument %q", fs.Arg(0))}
	case *srv == "" || *caFile == "":
		return usageError{errors.New("enroll: --server and --ca are required")}
	case (*token == "") == (*tpmPath == ""):
		return usageError{errors.New("enroll: give exactly one of --token and --tpm")}
	case *token != "" && *id == "":
		return usageError{errors.New("enroll: --token needs --device")}
	}
	pemBytes, err := os.ReadFile(*caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemBytes) {
		return fmt.Errorf("%s: no PEM certificate", *caFile)
	}
	st := state{Server: strings.TrimRight(*srv, "/"), DeviceID: *id, TPM: *tpmPath}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}
	var dev *devicesdk.Device
	if st.TPM != "" {
		t, err := tpmkey.Open(st.TPM)
		if err != nil {
			return err
		}
		defer t.Close()
		keys, err := t.LoadOrCreateKeys(*dir)
		if err != nil {
			return err
		}
		if st.DeviceID == "" {
			if keys.EK() == nil || keys.EK().Cert == nil {
				return fmt.Errorf("enroll: the TPM has no EK certificate: give --device")
			}
			st.DeviceID = api.AutoDeviceID(keys.EK().Cert.RawSubjectPublicKeyInfo)
		}
		if dev, err = newDevice(st, *dir, keys.Signer(), roots); err != nil {
			return err
		}
		if err := dev.EnrollTPM(ctx, keys); err != nil {
			return err
		}
	} else {
		key, err := devicesdk.NewSoftwareKey(*dir)
		if err != nil {
			return err
		}
		if dev, err = newDevice(st, *dir, key, roots); err != nil {
			return err
		}
		if err := dev.EnrollWithToken(ctx, *token); err != nil {
			return err
		}
	}
	if err := writeState(*dir, st); err != nil {
		return err
	}
	leaf := dev.Leaf()
	fmt.Fprintf(stdout, "enrolled %s: certificate %s, valid until %s\n", st.DeviceID, filepath.Join(*dir, devicesdk.ChainFile), leaf.NotAfter.UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "  CA file:  %s\n", filepath.Join(*dir, devicesdk.CAFile))
	if st.TPM == "" {
		fmt.Fprintf(stdout, "  key file: %s (0600)\n", filepath.Join(*dir, devicesdk.SoftKeyFile))
	} else {
		fmt.Fprintf(stdout, "  key:      in the TPM %s (blobs %s/tls.{pub,priv})\n", st.TPM, *dir)
	}
	fmt.Fprintf(stdout, "  renewal:  %s (fleetgate-device renew --daemon)\n", dev.NextRenewal(devicesdk.RenewOptions{Jitter: -1}).UTC().Format(time.RFC3339))
	return nil
}

func newDevice(st state, dir string, key crypto.Signer, roots *x509.CertPool) (*devicesdk.Device, error) {
	return devicesdk.New(devicesdk.Config{DeviceID: st.DeviceID, Key: key, StateDir: dir, EnrollURL: st.Server, RootCAs: roots})
}

func writeState(dir string, st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, StateFile), append(b, '\n'), 0o644)
}

// open loads an enrolled device from dir: agent.json, its key (software
// or TPM) and its certificate. close releases the TPM.
func open(dir string) (dev *devicesdk.Device, closeFn func(), err error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, nil, fmt.Errorf("not enrolled (run fleetgate-device enroll first): %w", err)
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", StateFile, err)
	}
	closeFn = func() {}
	var key crypto.Signer
	if st.TPM != "" {
		t, err := tpmkey.Open(st.TPM)
		if err != nil {
			return nil, nil, err
		}
		keys, err := t.LoadOrCreateKeys(dir)
		if err != nil {
			t.Close()
			return nil, nil, err
		}
		key, closeFn = keys.Signer(), func() { t.Close() }
	} else if key, err = devicesdk.NewSoftwareKey(dir); err != nil {
		return nil, nil, err
	}
	dev, err = newDevice(st, dir, key, nil)
	if err == nil && !dev.Enrolled() {
		err = devicesdk.ErrNotEnrolled
	}
	if err != nil {
		closeFn()
		return nil, nil, err
	}
	return dev, closeFn, nil
}

func parseSignal(s string) (syscall.Signal, error) {
	switch strings.TrimPrefix(strings.ToUpper(s), "SIG") {
	case "HUP":
		return syscall.SIGHUP, nil
	case "USR1":
		return syscall.SIGUSR1, nil
	case "USR2":
		return syscall.SIGUSR2, nil
	case "TERM":
		return syscall.SIGTERM, nil
	case "INT":
		return syscall.SIGINT, nil
	}
	return 0, usageError{fmt.Errorf("--signal %q: one of HUP, USR1, USR2, TERM, INT", s)}
}

func renewCmd(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs, dir := newFlags("renew")
	daemon := fs.Bool("daemon", false, "keep running: renew at 2/3 of each certificate's life, with jitter")
	pidFile := fs.String("pid-file", "", "after each renewal, signal the process whose PID this file holds")
	sigName := fs.String("signal", "HUP", "signal for --pid-file")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("renew: stray argument %q", fs.Arg(0))}
	}
	sig, err := parseSignal(*sigName)
	if err != nil {
		return err
	}
	dev, closeFn, err := open(*dir)
	if err != nil {
		return err
	}
	defer closeFn()
	notify := func() {
		log.Info("certificate renewed", "device", dev.ID(), "serial", fmt.Sprintf("%x", dev.Leaf().SerialNumber), "not_after", dev.Leaf().NotAfter)
		if *pidFile == "" {
			return
		}
		b, err := os.ReadFile(*pidFile)
		pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || perr != nil || pid <= 1 {
			log.Warn("cannot signal the client", "pid_file", *pidFile, "err", errors.Join(err, perr))
			return
		}
		if err := syscall.Kill(pid, sig); err != nil {
			log.Warn("cannot signal the client", "pid", pid, "err", err)
		}
	}
	if !*daemon {
		if err := dev.Renew(ctx); err != nil {
			return err
		}
		notify()
		fmt.Fprintf(stdout, "renewed %s: valid until %s\n", dev.ID(), dev.Leaf().NotAfter.UTC().Format(time.RFC3339))
		return nil
	}
	return renewLoop(ctx, dev, notify, log)
}

// renewLoop renews at 2/3 of each certificate's life with jitter (devicesdk's
// AutoRenew), calling notify after each renewal, until ctx ends.
func renewLoop(ctx context.Context, dev *devicesdk.Device, notify func(), log *slog.Logger) error {
	log.Info("renewal daemon", "device", dev.ID(), "next", dev.NextRenewal(devicesdk.RenewOptions{Jitter: -1}))
	err := dev.AutoRenew(ctx, devicesdk.RenewOptions{
		OnRenewed: notify,
		OnError:   func(err error) { log.Warn("renewal failed, will retry", "err", err) },
	})
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// runCmd runs CLIENT and the renewal loop; after each renewal the client
// gets --signal if given, or is restarted (SIGTERM, 10 s, SIGKILL, start
// again). When the client exits on its own, run exits with its status (a
// supervisor such as systemd restarts the pair).
func runCmd(ctx context.Context, args []string, log *slog.Logger) error {
	fs, dir := newFlags("run")
	sigName := fs.String("signal", "", "signal the client after a renewal instead of restarting it (HUP, USR1, ...)")
	if err := parse(fs, args); err != nil {
		return err
	}
	argv := fs.Args()
	if len(argv) == 0 {
		return usageError{errors.New("run: give the client after --")}
	}
	var sig syscall.Signal
	if *sigName != "" {
		s, err := parseSignal(*sigName)
		if err != nil {
			return err
		}
		sig = s
	}
	dev, closeFn, err := open(*dir)
	if err != nil {
		return err
	}
	defer closeFn()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	renewed := make(chan struct{}, 1)
	loopDone := make(chan error, 1)
	go func() {
		loopDone <- renewLoop(ctx, dev, func() {
			log.Info("certificate renewed", "device", dev.ID(), "not_after", dev.Leaf().NotAfter)
			select {
			case renewed <- struct{}{}:
			default:
			}
		}, log)
	}()
	defer func() { cancel(); <-loopDone }()

	for {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
		if err := cmd.Start(); err != nil {
			return err
		}
		log.Info("client started", "pid", cmd.Process.Pid, "cmd", argv[0])
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
	wait:
		for {
			select {
			case err := <-exited:
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					if ee.ExitCode() < 0 {
						return clientExit(1)
					}
					return clientExit(ee.ExitCode())
				}
				if err != nil {
					return err
				}
				return nil
			case <-ctx.Done():
				stopClient(cmd, exited)
				return nil
			case <-renewed:
				if sig != 0 {
					log.Info("signalling the client", "pid", cmd.Process.Pid, "signal", sig.String())
					_ = cmd.Process.Signal(sig)
					continue
				}
				log.Info("restarting the client", "pid", cmd.Process.Pid)
				stopClient(cmd, exited)
				break wait
			}
		}
	}
}

// stopClient ends the client it started: SIGTERM, then SIGKILL after 10 s.
func stopClient(cmd *exec.Cmd, exited <-chan error) {
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
}
