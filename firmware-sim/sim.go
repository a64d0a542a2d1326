// Package sim runs a simulated fleet against a running fleetgate: it
// registers and enrolls devices, connects them to the broker, publishes
// telemetry, answers commands from a simulated backend service, checks
// that the broker's policy holds, and reports what happened.
//
// Devices hold their keys in their own swtpm and enroll through TPM
// attestation (TPM "swtpm"), or use software keys and bootstrap tokens
// (TPM "none", for fleets larger than the machine holds swtpms for).
package sim

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/adminclient"
	"github.com/fleetgate/fleetgate/enroll/api"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// Config of a simulation run.
type Config struct {
	// ServerURL is the enrollment/admin API, e.g. https://localhost:8443.
	ServerURL string
	// BrokerAddr is the broker's mTLS address, e.g. localhost:8883.
	BrokerAddr string
	// ServerName is the TLS name of the broker (default "localhost").
	ServerName string
	// DataDir of the gateway, for the operator credentials and root CA.
	DataDir string
	// WorkDir keeps device state (default: a temp dir, removed at the end).
	WorkDir  string
	Devices  int
	Prefix   string
	Group    string
	Messages int // telemetry messages per device
	Interval time.Duration
	Payload  int
	Logger   *slog.Logger
	// Progress receives human-readable progress lines (nil: none).
	Progress io.Writer
	// TPM is TPMSwtpm (default: one swtpm per device, TPM attestation) or
	// TPMNone (software keys, bootstrap tokens).
	TPM string
	// OnFleet, if set, is called with the PIDs of the swtpm processes once
	// they run (tests use it to check none is left behind).
	OnFleet func(swtpmPIDs []int)

	roots *x509.CertPool
}

// Check is one verified property of the run.
type Check struct {
	Name   string `json:"name"`
	Passed bool   `json:"passed"`
	Detail string `json:"detail,omitempty"`
}

// Report is the outcome of a run.
type Report struct {
	Devices        int              `json:"devices"`
	TPM            string           `json:"tpm"`
	Enrolled       int              `json:"enrolled"`
	Connected      int              `json:"connected"`
	EnrollP50      time.Duration    `json:"enroll_p50_ns"`
	EnrollP99      time.Duration    `json:"enroll_p99_ns"`
	ConnectP50     time.Duration    `json:"connect_p50_ns"`
	ConnectP99     time.Duration    `json:"connect_p99_ns"`
	Sent           int64            `json:"messages_sent"`
	Delivered      int64            `json:"messages_delivered"`
	Lost           int64            `json:"messages_lost"`
	FirstDelivery  time.Duration    `json:"first_delivery_ns"`
	CommandsRTT    time.Duration    `json:"command_rtt_ns"`
	Checks         []Check          `json:"checks"`
	Elapsed        time.Duration    `json:"elapsed_ns"`
	ServiceName    string           `json:"service"`
	DeliveredByDev map[string]int64 `json:"-"`
}

// OK reports whether every check passed.
func (r *Report) OK() bool {
	for _, c := range r.Checks {
		if !c.Passed {
			return false
		}
	}
	return len(r.Checks) > 0
}

type device struct {
	id     string
	dev    *devicesdk.Device
	client *devicesdk.Client
}

// Run runs the simulation until done or ctx ends.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if cfg.Devices <= 0 {
		cfg.Devices = 3
	}
	if cfg.Prefix == "" {
		// A fresh prefix per run: devices of an earlier run keep their IDs
		// (and their registered EKs) in the registry.
		b := make([]byte, 2)
		_, _ = rand.Read(b)
		cfg.Prefix = fmt.Sprintf("sim-%x", b)
	}
	if cfg.Group == "" {
		cfg.Group = "sim"
	}
	if cfg.Messages <= 0 {
		cfg.Messages = 5
	}
	if cfg.Payload <= 0 {
		cfg.Payload = 64
	}
	if cfg.ServerName == "" {
		cfg.ServerName = "localhost"
	}
	if cfg.TPM == "" {
		cfg.TPM = TPMSwtpm
	}
	if cfg.TPM != TPMSwtpm && cfg.TPM != TPMNone {
		return nil, fmt.Errorf("--tpm %q: want swtpm or none", cfg.TPM)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	progress := func(f string, a ...any) {
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, f+"\n", a...)
		}
	}
	start := time.Now()
	if cfg.WorkDir == "" {
		d, err := os.MkdirTemp("", "fleetsim-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		cfg.WorkDir = d
	}
	admin, err := adminclient.New(cfg.ServerURL, adminclient.FromDataDir(cfg.DataDir))
	if err != nil {
		return nil, fmt.Errorf("operator credentials: %w", err)
	}
	root, err := ca.ReadCertFile(filepath.Join(cfg.DataDir, ca.RootCertFile))
	if err != nil {
		return nil, err
	}
	rep := &Report{Devices: cfg.Devices, TPM: cfg.TPM, DeliveredByDev: map[string]int64{}}
	cfg.roots = ca.NewPool(root)
	fl := &fleet{cfg: cfg, admin: admin}
	defer func() {
		if err := fl.Close(); err != nil {
			cfg.Logger.Error("stopping swtpm processes", "err", err)
		}
	}()

	// The backend service: a service certificate, subscribed to all telemetry.
	svcName := cfg.Prefix + "-backend"
	rep.ServiceName = svcName
	sr, err := admin.IssueService(ctx, api.ServiceIssueRequest{Name: svcName})
	if err != nil {
		return nil, fmt.Errorf("issue service certificate: %w", err)
	}
	svcCert, err := tls.X509KeyPair([]byte(sr.CertificateChainPEM), []byte(sr.PrivateKeyPEM))
	if err != nil {
		return nil, err
	}
	var delivered atomic.Int64
	var mu sync.Mutex
	firstAt := time.Time{}
	seen := map[string]bool{}
	pongs := make(chan string, cfg.Devices)
	roots := cfg.roots
	backend := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + cfg.BrokerAddr).SetClientID(svcName).
		SetTLSConfig(&tls.Config{RootCAs: roots, ServerName: cfg.ServerName, Certificates: []tls.Certificate{svcCert}, MinVersion: tls.VersionTLS13}).
		SetCleanSession(true).SetOrderMatters(false))
	if t := backend.Connect(); !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("backend connect: %v", t.Error())
	}
	defer backend.Disconnect(250)
	subTok := backend.Subscribe("devices/+/telemetry/#", 1, func(_ paho.Client, m paho.Message) {
		var tm telemetry
		if json.Unmarshal(m.Payload(), &tm) != nil {
			return
		}
		if tm.Kind == "pong" {
			pongs <- tm.Device
			return
		}
		key := fmt.Sprintf("%s/%d", tm.Device, tm.Seq)
		mu.Lock()
		if !seen[key] {
			seen[key] = true
			delivered.Add(1)
			rep.DeliveredByDev[tm.Device]++
			if firstAt.IsZero() {
				firstAt = time.Now()
			}
		}
		mu.Unlock()
	})
	if !subTok.WaitTimeout(10*time.Second) || subTok.Error() != nil {
		return nil, fmt.Errorf("backend subscribe: %v", subTok.Error())
	}
	progress("backend service %s connected, subscribed to devices/+/telemetry/#", svcName)

	// Enroll and connect every device.
	devs := make([]*device, cfg.Devices)
	var enrollLat, connLat []time.Duration
	var errs []error
	var tdevs []*tpmDevice
	if cfg.TPM == TPMSwtpm {
		if tdevs, err = fl.manufacture(ctx, cfg.Devices, progress); err != nil {
			return nil, err
		}
		if cfg.OnFleet != nil {
			cfg.OnFleet(fl.SwtpmPIDs())
		}
	}
	for i := range devs {
		id := fl.id(i)
		t0 := time.Now()
		var d *devicesdk.Device
		method := "token"
		if cfg.TPM == TPMSwtpm {
			d, err = fl.enrollTPM(ctx, tdevs[i])
			method = "TPM attestation"
		} else {
			d, err = fl.enrollToken(ctx, id)
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			errs = append(errs, err)
			continue
		}
		enrollLat = append(enrollLat, time.Since(t0))
		rep.Enrolled++
		t1 := time.Now()
		c, err := d.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: cfg.BrokerAddr, ServerName: cfg.ServerName, CleanSession: true})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: connect: %w", id, err))
			continue
		}
		connLat = append(connLat, time.Since(t1))
		rep.Connected++
		devs[i] = &device{id: id, dev: d, client: c}
		progress("device %s enrolled (%s) and connected as %s", id, method, d.Leaf().URIs[0])
	}
	defer func() {
		for _, d := range devs {
			if d != nil {
				d.client.Close()
			}
		}
	}()
	rep.EnrollP50, rep.EnrollP99 = percentiles(enrollLat)
	rep.ConnectP50, rep.ConnectP99 = percentiles(connLat)
	rep.Checks = append(rep.Checks, Check{Name: "every device enrolled and connected", Passed: rep.Connected == cfg.Devices,
		Detail: fmt.Sprintf("%d/%d connected; %v", rep.Connected, cfg.Devices, errors.Join(errs...))})

	// Each device answers commands on its own topic.
	for _, d := range devs {
		if d == nil {
			continue
		}
		d := d
		err := d.client.SubscribeCommands(ctx, 1, func(m devicesdk.Message) {
			b, _ := json.Marshal(telemetry{Device: d.id, Kind: "pong"})
			go d.client.PublishTelemetry(context.Background(), "pong", 1, b)
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: subscribe commands: %w", d.id, err))
		}
	}

	// Telemetry.
	payload := make([]byte, cfg.Payload)
	var sent atomic.Int64
	var wg sync.WaitGroup
	for _, d := range devs {
		if d == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range cfg.Messages {
				b, _ := json.Marshal(telemetry{Device: d.id, Seq: seq, Kind: "temp", Pad: payload[:max(0, cfg.Payload-48)]})
				if err := d.client.PublishTelemetry(ctx, "temp", 1, b); err == nil {
					sent.Add(1)
				}
				if cfg.Interval > 0 {
					select {
					case <-time.After(cfg.Interval):
					case <-ctx.Done():
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	rep.Sent = sent.Load()
	waitFor(ctx, 10*time.Second, func() bool { return delivered.Load() >= rep.Sent })
	rep.Delivered = delivered.Load()
	rep.Lost = rep.Sent - rep.Delivered
	mu.Lock()
	if !firstAt.IsZero() {
		rep.FirstDelivery = firstAt.Sub(start)
	}
	mu.Unlock()
	progress("telemetry: %d sent, %d delivered to %s", rep.Sent, rep.Delivered, svcName)
	rep.Checks = append(rep.Checks, Check{Name: "every QoS 1 telemetry message reached the backend", Passed: rep.Sent > 0 && rep.Lost == 0,
		Detail: fmt.Sprintf("%d sent, %d delivered", rep.Sent, rep.Delivered)})

	// Command round trip: the backend commands the first device.
	if live := liveDevices(devs); len(live) > 0 {
		t0 := time.Now()
		target := live[0]
		backend.Publish("devices/"+target.id+"/commands/ping", 1, false, "ping").WaitTimeout(5 * time.Second)
		select {
		case id := <-pongs:
			rep.CommandsRTT = time.Since(t0)
			rep.Checks = append(rep.Checks, Check{Name: "command round trip backend -> device -> backend", Passed: id == target.id,
				Detail: fmt.Sprintf("%s answered in %s", id, rep.CommandsRTT.Round(time.Microsecond))})
			progress("command round trip to %s: %s", id, rep.CommandsRTT.Round(time.Microsecond))
		case <-time.After(10 * time.Second):
			rep.Checks = append(rep.Checks, Check{Name: "command round trip backend -> device -> backend", Detail: "no answer within 10s"})
		}
	}

	// Policy: a device may not publish into another device's topic, nor
	// subscribe to another device's commands.
	if live := liveDevices(devs); len(live) >= 2 {
		a, b := live[0], live[1]
		before := rep.DeliveredByDev[b.id]
		forged, _ := json.Marshal(telemetry{Device: b.id, Seq: 1 << 30, Kind: "temp"})
		_ = a.client.Publish(ctx, "devices/"+b.id+"/telemetry/temp", 0, false, forged)
		subErr := a.client.Subscribe(ctx, "devices/"+b.id+"/commands/#", 1, func(devicesdk.Message) {})
		// A marker from a on its own topic, published after the forgery: once
		// it arrives, the forgery would have too.
		marker, _ := json.Marshal(telemetry{Device: a.id, Seq: 1<<30 + 1, Kind: "temp"})
		_ = a.client.PublishTelemetry(ctx, "temp", 1, marker)
		waitFor(ctx, 5*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return seen[fmt.Sprintf("%s/%d", a.id, 1<<30+1)]
		})
		mu.Lock()
		after := rep.DeliveredByDev[b.id]
		mu.Unlock()
		rep.Checks = append(rep.Checks,
			Check{Name: "a device publishing into another device's topic is not delivered", Passed: after == before,
				Detail: fmt.Sprintf("%s -> devices/%s/telemetry/temp: dropped by the broker's ACL", a.id, b.id)},
			Check{Name: "a device subscribing to another device's commands is refused", Passed: errors.Is(subErr, devicesdk.ErrSubscriptionRefused),
				Detail: fmt.Sprintf("%s -> devices/%s/commands/#: %v", a.id, b.id, subErr)})
		progress("policy: %s publishing into devices/%s/... was dropped; subscribing to its commands was refused", a.id, b.id)
	}
	rep.Elapsed = time.Since(start)
	return rep, nil
}

type telemetry struct {
	Device string `json:"device"`
	Seq    int    `json:"seq"`
	Kind   string `json:"kind"`
	Pad    []byte `json:"pad,omitempty"`
}

func liveDevices(ds []*device) []*device {
	var out []*device
	for _, d := range ds {
		if d != nil {
			out = append(out, d)
		}
	}
	return out
}

func waitFor(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

func percentiles(ds []time.Duration) (p50, p99 time.Duration) {
	if len(ds) == 0 {
		return 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)*50/100], s[min(len(s)-1, len(s)*99/100)]
}

// WriteTable prints the report for humans.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "\nfleetsim report (%s)\n", r.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(w, "  devices            %d enrolled, %d connected of %d (keys: %s)\n", r.Enrolled, r.Connected, r.Devices, r.TPM)
	fmt.Fprintf(w, "  enrollment         p50 %s  p99 %s\n", r.EnrollP50.Round(time.Microsecond), r.EnrollP99.Round(time.Microsecond))
	fmt.Fprintf(w, "  connect (mTLS)     p50 %s  p99 %s\n", r.ConnectP50.Round(time.Microsecond), r.ConnectP99.Round(time.Microsecond))
	fmt.Fprintf(w, "  telemetry (QoS 1)  %d sent, %d delivered, %d lost\n", r.Sent, r.Delivered, r.Lost)
	fmt.Fprintf(w, "  first delivery     %s after start\n", r.FirstDelivery.Round(time.Millisecond))
	fmt.Fprintln(w, "  checks:")
	for _, c := range r.Checks {
		mark := "PASS"
		if !c.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "    [%s] %s (%s)\n", mark, c.Name, c.Detail)
	}
}
