package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/firmware-sim/swtpm"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

func needTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
				t.Fatalf("%s is required: %v", tool, err)
			}
			t.Skipf("%s not installed", tool)
		}
	}
}

// agent runs the agent in-process with args until it returns or ctx ends.
type agent struct {
	out  bytes.Buffer
	mu   sync.Mutex
	done chan int
}

func (a *agent) Write(b []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.out.Write(b)
}

func (a *agent) String() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.out.String()
}

func startAgent(ctx context.Context, args ...string) *agent {
	a := &agent{done: make(chan int, 1)}
	go func() { a.done <- run(ctx, args, a, a) }()
	return a
}

func runAgent(t *testing.T, args ...string) string {
	t.Helper()
	a := startAgent(context.Background(), args...)
	if code := <-a.done; code != 0 {
		t.Fatalf("fleetgate-device %s: exit %d\n%s", strings.Join(args, " "), code, a.String())
	}
	return a.String()
}

func leafOf(t *testing.T, dir string) *x509.Certificate {
	t.Helper()
	cs, err := ca.ReadCertsFile(filepath.Join(dir, devicesdk.ChainFile))
	if err != nil {
		t.Fatal(err)
	}
	return cs[0]
}

func writeRoot(t *testing.T, g *testenv.Gateway) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "root.crt")
	if err := os.WriteFile(p, []byte(g.CA.RootPEM()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// clientScript is an MQTT client run by the agent: at start it records its
// PID and the certificate's serial, publishes with mosquitto_pub from the
// agent's files (QoS 1: a PUBACK means the broker admitted it), and on
// SIGHUP records the serial it now finds.
func clientScript(t *testing.T, dir, mqttAddr, id, logFile string) string {
	t.Helper()
	host, port, _ := strings.Cut(mqttAddr, ":")
	serial := fmt.Sprintf("$(openssl x509 -in %s/cert.pem -noout -serial)", dir)
	// The trap comes first: a renewal may signal the client before its
	// first publish is done (on a loaded machine it was, and SIGHUP's
	// default action ended the shell).
	s := fmt.Sprintf(`#!/bin/sh
trap 'echo "hup $$ %[1]s" >> %[2]s' HUP
echo "start $$ %[1]s" >> %[2]s
mosquitto_pub -h %[3]s -p %[4]s --cafile %[5]s/ca.pem --cert %[5]s/cert.pem --key %[5]s/device.key -i %[6]s -q 1 -t devices/%[6]s/telemetry/t -m hi && echo "pub ok $$" >> %[2]s
while :; do sleep 0.1; done
`, serial, logFile, host, port, dir, id)
	p := filepath.Join(t.TempDir(), "client.sh")
	if err := os.WriteFile(p, []byte(s), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// serialIn is the serial in a client log line ("... serial=HEX").
func serialIn(line string) string {
	_, s, _ := strings.Cut(line, "serial=")
	return s
}

func waitFor(t *testing.T, what string, d time.Duration, a *agent, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; agent log:\n%s", what, a.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func lines(p, prefix string) []string {
	b, _ := os.ReadFile(p)
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return out
}

// TestAgentEnrollsRenewsAndTellsTheClient: against a real server with 12 s
// device certificates, the agent enrolls by token and writes cert.pem,
// ca.pem and device.key (0600); `run -- CLIENT` starts a mosquitto_pub
// client that is admitted, renews at 2/3 of the life and restarts the
// client, which is admitted with the new certificate; `run --signal HUP`
// signals it instead, and so does `renew --daemon --pid-file` for a client
// it did not start. The agent stops the client it started.
func TestAgentEnrollsRenewsAndTellsTheClient(t *testing.T) {
	needTools(t, "mosquitto_pub", "openssl")
	g := testenv.Start(t, testenv.Options{DeviceCertTTL: 12 * time.Second})
	dir := filepath.Join(t.TempDir(), "agent")
	tok := g.Token(t, "sensor-a", "lab", time.Hour)

	out := runAgent(t, "enroll", "--server", g.URL(), "--ca", writeRoot(t, g), "--device", "sensor-a", "--token", tok, "--dir", dir)
	if !strings.Contains(out, "enrolled sensor-a") {
		t.Fatalf("enroll output:\n%s", out)
	}
	fi, err := os.Stat(filepath.Join(dir, devicesdk.SoftKeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("device.key: %v %v", fi.Mode(), err)
	}
	first := leafOf(t, dir)
	if life := first.NotAfter.Sub(first.NotBefore); life > 15*time.Second {
		t.Fatalf("certificate life %s, want the server's 12s", life)
	}
	// a second enroll with the spent token fails, and leaves the files as they are
	if code := <-startAgent(context.Background(), "enroll", "--server", g.URL(), "--ca", writeRoot(t, g), "--device", "sensor-a", "--token", tok, "--dir", dir).done; code != 1 {
		t.Fatalf("enroll with a spent token: exit %d", code)
	}
	if leafOf(t, dir).SerialNumber.Cmp(first.SerialNumber) != 0 {
		t.Fatal("a failed enroll replaced the certificate")
	}

	for _, mode := range []string{"restart", "signal", "daemon"} {
		t.Run(mode, func(t *testing.T) {
			logFile := filepath.Join(t.TempDir(), "client.log")
			script := clientScript(t, dir, g.Addrs.MQTT, "sensor-a", logFile)
			args := []string{"run", "--dir", dir}
			switch mode {
			case "signal":
				args = append(args, "--signal", "HUP", "--", "/bin/sh", script)
			case "daemon":
				// the client runs on its own; renew --daemon signals it through its PID file
				client := exec.Command("/bin/sh", script)
				if err := client.Start(); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { client.Process.Kill(); client.Wait() })
				pidFile := filepath.Join(t.TempDir(), "client.pid")
				if err := os.WriteFile(pidFile, []byte(strconv.Itoa(client.Process.Pid)+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				args = []string{"renew", "--daemon", "--dir", dir, "--pid-file", pidFile, "--signal", "HUP"}
			default:
				args = append(args, "--", "/bin/sh", script)
			}
			ctx, cancel := context.WithCancel(context.Background())
			a := startAgent(ctx, args...)
			stopped := false
			stop := func() {
				if !stopped {
					stopped = true
					cancel()
					if code := <-a.done; code != 0 {
						t.Errorf("run exited %d\n%s", code, a.String())
					}
				}
			}
			t.Cleanup(stop)
			waitFor(t, "the client's first publish", 20*time.Second, a, func() bool { return len(lines(logFile, "pub ok")) >= 1 })
			before := leafOf(t, dir).SerialNumber
			if mode == "restart" {
				waitFor(t, "a renewal and the restarted client's publish", 30*time.Second, a, func() bool { return len(lines(logFile, "pub ok")) >= 2 })
				starts := lines(logFile, "start")
				if len(starts) < 2 || serialIn(starts[0]) == "" || serialIn(starts[0]) == serialIn(starts[1]) {
					t.Fatalf("client not restarted on a new certificate:\n%s", strings.Join(starts, "\n"))
				}
			} else { // signal, daemon
				waitFor(t, "a renewal and SIGHUP", 30*time.Second, a, func() bool { return len(lines(logFile, "hup")) >= 1 })
				if n := len(lines(logFile, "start")); n != 1 {
					t.Fatalf("--signal restarted the client (%d starts)", n)
				}
				// the client, signalled, finds the new certificate in place
				if hup, start := serialIn(lines(logFile, "hup")[0]), serialIn(lines(logFile, "start")[0]); hup == "" || hup == start {
					t.Fatalf("SIGHUP, but the certificate is still %s", start)
				}
			}
			if leafOf(t, dir).SerialNumber.Cmp(before) == 0 {
				t.Fatal("certificate not renewed")
			}
			stop()
			if mode == "daemon" {
				return // the test started that client, and stops it
			}
			for _, l := range lines(logFile, "start") {
				pid, _ := strconv.Atoi(strings.Fields(l)[1])
				if pid > 0 && syscall.Kill(pid, 0) == nil {
					t.Errorf("client %d still runs after the agent stopped", pid)
				}
			}
		})
	}
	if m := g.Metrics(t); !strings.Contains(m, `fleetgate_own_certificate_expiring{cert="server"} 0`) {
		t.Errorf("own certificate metric missing:\n%s", m)
	}
}

// TestAgentTPMEnrollAndRenew: with a swtpm whose EK is registered, the agent
// enrolls by TPM attestation, renews, and keeps no private key on disk; a Go
// client (devicesdk + tpmkey) connects with the TPM key and the agent's
// certificate.
func TestAgentTPMEnrollAndRenew(t *testing.T) {
	m := swtpm.ManufacturerForTest(t)
	roots := t.TempDir()
	if err := os.WriteFile(filepath.Join(roots, "mfr.pem"), m.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	g := testenv.Start(t, testenv.Options{TPMRootsDir: roots, DeviceCertTTL: time.Hour})
	inst := swtpm.StartForTest(t, m)
	dir := filepath.Join(t.TempDir(), "agent")

	// the EK certificate, as the manufacturer's list would give it
	tpm, err := tpmkey.Open(inst.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	ek, err := tpm.EK()
	tpm.Close()
	if err != nil {
		t.Fatal(err)
	}
	id := api.AutoDeviceID(ek.Cert.RawSubjectPublicKeyInfo)
	if _, err := g.Admin.RegisterEK(context.Background(), api.EKRegisterRequest{EKCert: ek.CertDER, DeviceID: id, Group: "lab"}); err != nil {
		t.Fatal(err)
	}

	out := runAgent(t, "enroll", "--server", g.URL(), "--ca", writeRoot(t, g), "--tpm", inst.SocketPath(), "--dir", dir)
	if !strings.Contains(out, "enrolled "+id) || !strings.Contains(out, "in the TPM") {
		t.Fatalf("enroll output:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, devicesdk.SoftKeyFile)); !os.IsNotExist(err) {
		t.Fatalf("a software key was written in TPM mode: %v", err)
	}
	first := leafOf(t, dir)
	runAgent(t, "renew", "--dir", dir)
	second := leafOf(t, dir)
	if second.SerialNumber.Cmp(first.SerialNumber) == 0 {
		t.Fatal("renew did not replace the certificate")
	}
	if !second.PublicKey.(*ecdsa.PublicKey).Equal(first.PublicKey) {
		t.Fatal("renewal changed the key: it must stay the TPM's")
	}
	info, err := g.Admin.Device(context.Background(), id)
	if err != nil || info.AttestationMethod != "tpm" || info.Serial != ca.SerialString(second.SerialNumber) {
		t.Fatalf("device after renewal: %+v %v", info, err)
	}

	// a Go client uses the agent's directory and the key in the TPM
	dev, closeFn, err := open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := dev.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.PublishTelemetry(ctx, "t", 1, []byte("hi")); err != nil {
		t.Fatal(err)
	}
}

// A test binary started with SIGHUP ignored (under nohup, say) would pass
// that to the agent and on to the client shell, whose HUP trap a
// non-interactive sh then silently refuses: handled here, SIGHUP is back
// to its default in every process the test starts.
func init() { signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP) }
