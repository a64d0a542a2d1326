// Package sim runs a simulated fleet against fleetgate: it manufactures
// devices (one swtpm each, or software keys), registers their EKs as a
// factory would, enrolls them, connects them to the broker, publishes
// telemetry, answers commands from a simulated backend service, runs a
// scenario (steady, revoke, restart, renew, storm), checks what must hold,
// and reports it.
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/adminclient"
	"github.com/fleetgate/fleetgate/enroll/ca"
)

// Scenarios.
const (
	ScenarioSteady  = "steady"
	ScenarioRevoke  = "revoke"
	ScenarioRestart = "restart"
	ScenarioRenew   = "renew"
	ScenarioStorm   = "storm"
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
	// Spawn runs a gateway of fleetsim's own (fleetgate init + serve in the
	// work dir, stopped at the end); needed by the restart and renew
	// scenarios. FleetgateBin is its binary (default: next to fleetsim).
	Spawn        bool
	FleetgateBin string
	// WorkDir keeps device state (default: a temp dir, removed).
	WorkDir  string
	Devices  int
	Prefix   string
	Group    string
	Messages int // telemetry messages per device in the steady phase
	Interval time.Duration
	Payload  int
	Scenario string
	// RevokeFraction of the fleet is revoked by the revoke scenario.
	RevokeFraction float64
	// CertTTL is the device certificate lifetime of a spawned gateway for
	// the renew scenario (default 20s).
	CertTTL time.Duration
	Logger  *slog.Logger
	// Progress receives human-readable progress lines (nil: none).
	Progress io.Writer
	// TPM is TPMSwtpm (default) or TPMNone.
	TPM string
	// SkipRegistration leaves the EKs unregistered (a factory that forgot),
	// to exercise the refusal path and its runbook.
	SkipRegistration bool
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
	Scenario      string        `json:"scenario"`
	TPM           string        `json:"tpm"`
	Devices       int           `json:"devices"`
	Enrolled      int           `json:"enrolled"`
	Connected     int           `json:"connected"`
	EnrollP50     time.Duration `json:"enroll_p50_ns"`
	EnrollP99     time.Duration `json:"enroll_p99_ns"`
	ConnectP50    time.Duration `json:"connect_p50_ns"`
	ConnectP99    time.Duration `json:"connect_p99_ns"`
	Sent          int64         `json:"messages_sent"`
	Delivered     int64         `json:"messages_delivered"`
	Lost          int64         `json:"messages_lost"`
	MsgsPerSec    float64       `json:"messages_per_second"`
	FirstDelivery time.Duration `json:"first_delivery_ns"`
	CommandRTT    time.Duration `json:"command_rtt_ns"`
	Checks        []Check       `json:"checks"`
	Elapsed       time.Duration `json:"elapsed_ns"`
	Errors        []string      `json:"errors,omitempty"`
	// With --spawn: the gateway's resident memory before the devices
	// connected and with all of them connected, and the difference per
	// connection.
	GatewayRSSBeforeKB int64   `json:"gateway_rss_before_kb,omitempty"`
	GatewayRSSAfterKB  int64   `json:"gateway_rss_after_kb,omitempty"`
	RSSPerConnectionKB float64 `json:"rss_per_connection_kb,omitempty"`
	ConnectsPerSec     float64 `json:"connects_per_second"`
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

func (r *Report) check(name string, ok bool, f string, a ...any) {
	r.Checks = append(r.Checks, Check{Name: name, Passed: ok, Detail: fmt.Sprintf(f, a...)})
}

// device is one simulated device at run time.
type device struct {
	id    string
	dev   *devicesdk.Device
	mu    sync.Mutex
	c     *devicesdk.Client
	seq   atomic.Int64 // last sequence number handed to Publish
	acked sync.Map     // seq -> struct{}: the broker acknowledged it
	nack  atomic.Int64
	renew atomic.Int64
}

func (d *device) client() *devicesdk.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.c
}

// receiver is the backend's view: which (device, seq) arrived, and when.
type receiver struct {
	mu     sync.Mutex
	got    map[string]map[int64]time.Time
	first  time.Time
	pongs  chan string
	events atomic.Int64
}

type telemetry struct {
	Device string `json:"device"`
	Seq    int64  `json:"seq"`
	Kind   string `json:"kind"`
	Pad    []byte `json:"pad,omitempty"`
}

func (rc *receiver) handle(_ paho.Client, m paho.Message) {
	var tm telemetry
	if json.Unmarshal(m.Payload(), &tm) != nil {
		return
	}
	if tm.Kind == "pong" {
		select {
		case rc.pongs <- tm.Device:
		default:
		}
		return
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.got[tm.Device] == nil {
		rc.got[tm.Device] = map[int64]time.Time{}
	}
	if _, dup := rc.got[tm.Device][tm.Seq]; !dup {
		rc.got[tm.Device][tm.Seq] = time.Now()
	}
	if rc.first.IsZero() {
		rc.first = time.Now()
	}
}

func (rc *receiver) has(id string, seq int64) bool {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	_, ok := rc.got[id][seq]
	return ok
}

func (rc *receiver) count() int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	n := 0
	for _, m := range rc.got {
		n += len(m)
	}
	return int64(n)
}

// maxSeq is the highest sequence received from id.
func (rc *receiver) maxSeq(id string) int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var m int64 = -1
	for s := range rc.got[id] {
		m = max(m, s)
	}
	return m
}

type run struct {
	cfg      Config
	rep      *Report
	admin    *adminclient.Client
	fleet    *fleet
	gw       *gatewayProc
	recv     *receiver
	backend  paho.Client
	devs     []*device
	payload  []byte
	progress func(string, ...any)
}

// Run runs the simulation until done or ctx ends. Every swtpm and gateway
// process it started is stopped before it returns, also on error.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	start := time.Now()
	r := &run{cfg: cfg, rep: &Report{Devices: cfg.Devices, TPM: cfg.TPM, Scenario: cfg.Scenario},
		recv: &receiver{got: map[string]map[int64]time.Time{}, pongs: make(chan string, cfg.Devices+1)}}
	r.progress = func(f string, a ...any) {
		if cfg.Progress != nil {
			fmt.Fprintf(cfg.Progress, f+"\n", a...)
		}
	}
	if r.cfg.WorkDir == "" {
		d, err := os.MkdirTemp("", "fleetsim-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(d)
		r.cfg.WorkDir = d
	}
	defer r.close()
	if err := r.setup(ctx); err != nil {
		return nil, err
	}
	r.steady(ctx)
	// Every scenario starts from a fleet shown to work: delivery, a
	// command round trip, and the policy.
	r.steadyChecks(ctx)
	var err error
	switch cfg.Scenario {
	case ScenarioSteady:
	case ScenarioRevoke:
		err = r.revoke(ctx)
	case ScenarioRestart:
		err = r.restart(ctx)
	case ScenarioRenew:
		err = r.renewScenario(ctx)
	case ScenarioStorm:
		err = r.storm(ctx)
	}
	if err != nil {
		return nil, err
	}
	r.account()
	r.rep.Elapsed = time.Since(start)
	r.recv.mu.Lock()
	if !r.recv.first.IsZero() {
		r.rep.FirstDelivery = r.recv.first.Sub(start)
	}
	r.recv.mu.Unlock()
	return r.rep, nil
}

func (c *Config) defaults() error {
	if c.Devices <= 0 {
		c.Devices = 3
	}
	if c.Prefix == "" {
		// A fresh prefix per run: devices of an earlier run keep their IDs
		// (and their registered EKs) in the registry.
		b := make([]byte, 2)
		_, _ = rand.Read(b)
		c.Prefix = fmt.Sprintf("sim-%x", b)
	}
	if c.Group == "" {
		c.Group = "sim"
	}
	if c.Messages <= 0 {
		c.Messages = 5
	}
	if c.Payload <= 0 {
		c.Payload = 64
	}
	if c.ServerName == "" {
		c.ServerName = "localhost"
	}
	if c.TPM == "" {
		c.TPM = TPMSwtpm
	}
	if c.TPM != TPMSwtpm && c.TPM != TPMNone {
		return fmt.Errorf("tpm %q: want swtpm or none", c.TPM)
	}
	if c.Scenario == "" {
		c.Scenario = ScenarioSteady
	}
	switch c.Scenario {
	case ScenarioSteady, ScenarioRevoke, ScenarioStorm:
	case ScenarioRestart, ScenarioRenew:
		if !c.Spawn {
			return fmt.Errorf("scenario %s restarts or reconfigures the gateway: run it with --spawn", c.Scenario)
		}
	default:
		return fmt.Errorf("scenario %q: want steady, revoke, restart, renew or storm", c.Scenario)
	}
	if c.RevokeFraction <= 0 || c.RevokeFraction > 1 {
		c.RevokeFraction = 0.2
	}
	if c.CertTTL <= 0 {
		c.CertTTL = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

func (r *run) close() {
	for _, d := range r.devs {
		if d != nil {
			if c := d.client(); c != nil {
				c.Close()
			}
		}
	}
	if r.backend != nil {
		r.backend.Disconnect(100)
	}
	if r.fleet != nil {
		if err := r.fleet.Close(); err != nil {
			r.cfg.Logger.Error("stopping swtpm processes", "err", err)
		}
	}
	if r.gw != nil {
		r.gw.stop()
	}
}

func (r *run) connectOpts() devicesdk.ConnectOptions {
	// Persistent sessions with auto-reconnect: what a real device runs.
	return devicesdk.ConnectOptions{BrokerAddr: r.cfg.BrokerAddr, ServerName: r.cfg.ServerName, AutoReconnect: true, MaxReconnectInterval: time.Second, KeepAlive: 30 * time.Second}
}

func (r *run) setup(ctx context.Context) error {
	cfg := &r.cfg
	if cfg.Spawn {
		bin := cfg.FleetgateBin
		if bin == "" {
			var err error
			if bin, err = findFleetgate(); err != nil {
				return fmt.Errorf("--spawn needs the fleetgate binary (next to fleetsim or on PATH): %w", err)
			}
		}
		var extra []string
		if cfg.Scenario == ScenarioRenew {
			extra = append(extra, "--device-cert-ttl", cfg.CertTTL.String())
		}
		gw, err := startGateway(ctx, bin, cfg.WorkDir, extra)
		if err != nil {
			return err
		}
		r.gw = gw
		cfg.DataDir, cfg.ServerURL, cfg.BrokerAddr = gw.dataDir, "https://"+gw.addrs().API, gw.addrs().MQTT
		r.progress("gateway started (pid %d): API %s, MQTT %s", gw.pid(), gw.addrs().API, gw.addrs().MQTT)
	}
	var err error
	if r.admin, err = adminclient.New(cfg.ServerURL, adminclient.FromDataDir(cfg.DataDir)); err != nil {
		return fmt.Errorf("operator credentials: %w", err)
	}
	root, err := ca.ReadCertFile(filepath.Join(cfg.DataDir, ca.RootCertFile))
	if err != nil {
		return err
	}
	cfg.roots = ca.NewPool(root)
	r.fleet = &fleet{cfg: *cfg, admin: r.admin}
	r.payload = make([]byte, max(0, cfg.Payload-48))

	// The backend service: a service certificate, a persistent session
	// subscribed to all telemetry.
	svcName := cfg.Prefix + "-backend"
	sr, err := r.admin.IssueService(ctx, api.ServiceIssueRequest{Name: svcName})
	if err != nil {
		return fmt.Errorf("issue service certificate: %w", err)
	}
	svcCert, err := tls.X509KeyPair([]byte(sr.CertificateChainPEM), []byte(sr.PrivateKeyPEM))
	if err != nil {
		return err
	}
	r.backend = paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + cfg.BrokerAddr).SetClientID(svcName).
		SetTLSConfig(&tls.Config{RootCAs: cfg.roots, ServerName: cfg.ServerName, Certificates: []tls.Certificate{svcCert}, MinVersion: tls.VersionTLS13}).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(time.Second).SetOrderMatters(false).
		SetDefaultPublishHandler(r.recv.handle))
	if t := r.backend.Connect(); !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		return fmt.Errorf("backend connect: %v", t.Error())
	}
	if t := r.backend.Subscribe("devices/+/telemetry/#", 1, nil); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return fmt.Errorf("backend subscribe: %v", t.Error())
	}
	r.progress("backend service %s connected, subscribed to devices/+/telemetry/#", svcName)

	var tdevs []*tpmDevice
	if cfg.TPM == TPMSwtpm {
		if tdevs, err = r.fleet.manufacture(ctx, cfg.Devices, r.progress); err != nil {
			return err
		}
		if cfg.OnFleet != nil {
			cfg.OnFleet(r.fleet.SwtpmPIDs())
		}
	}
	r.devs = make([]*device, cfg.Devices)
	var enrollLat, connLat []time.Duration
	if r.gw != nil {
		runtimeGC()
		r.rep.GatewayRSSBeforeKB = rssKB(r.gw.pid())
	}
	var errs []error
	for i := range r.devs {
		id := r.fleet.id(i)
		t0 := time.Now()
		var d *devicesdk.Device
		method := "token"
		if cfg.TPM == TPMSwtpm {
			d, err = r.fleet.enrollTPM(ctx, tdevs[i])
			method = "TPM attestation"
		} else {
			d, err = r.fleet.enrollToken(ctx, id)
		}
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			errs = append(errs, err)
			continue
		}
		enrollLat = append(enrollLat, time.Since(t0))
		r.rep.Enrolled++
		dv := &device{id: id, dev: d}
		dv.seq.Store(-1)
		r.answerCommands(dv)
		t1 := time.Now()
		c, err := d.Connect(ctx, r.connectOpts())
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: connect: %w", id, err))
			continue
		}
		if err := c.SubscribeCommands(ctx, 1, r.commandHandler(dv)); err != nil {
			errs = append(errs, fmt.Errorf("%s: subscribe: %w", id, err))
		}
		connLat = append(connLat, time.Since(t1))
		r.rep.Connected++
		dv.c = c
		r.devs[i] = dv
		if cfg.Devices <= 20 || (i+1)%50 == 0 {
			r.progress("device %s enrolled (%s) and connected as %s [%d/%d]", id, method, d.Leaf().URIs[0], i+1, cfg.Devices)
		}
	}
	if r.gw != nil && r.rep.Connected > 0 {
		r.rep.GatewayRSSAfterKB = rssKB(r.gw.pid())
		r.rep.RSSPerConnectionKB = float64(r.rep.GatewayRSSAfterKB-r.rep.GatewayRSSBeforeKB) / float64(r.rep.Connected)
	}
	var connTotal time.Duration
	for _, l := range connLat {
		connTotal += l
	}
	if connTotal > 0 {
		r.rep.ConnectsPerSec = float64(len(connLat)) / connTotal.Seconds()
	}
	r.rep.EnrollP50, r.rep.EnrollP99 = percentiles(enrollLat)
	r.rep.ConnectP50, r.rep.ConnectP99 = percentiles(connLat)
	for _, e := range errs {
		r.rep.Errors = append(r.rep.Errors, e.Error())
	}
	r.rep.check("every device enrolled and connected", r.rep.Connected == cfg.Devices,
		"%d/%d connected; %d errors", r.rep.Connected, cfg.Devices, len(errs))
	return nil
}

func (r *run) commandHandler(d *device) func(devicesdk.Message) {
	return func(devicesdk.Message) {
		b, _ := json.Marshal(telemetry{Device: d.id, Kind: "pong"})
		go func() {
			if c := d.client(); c != nil {
				_ = c.PublishTelemetry(context.Background(), "pong", 1, b)
			}
		}()
	}
}

// answerCommands registers the device's command handler for every
// connection it will have.
func (r *run) answerCommands(d *device) {
	d.dev.Handle(devicesdk.CommandsFilter(d.id), r.commandHandler(d))
}

func (r *run) live() []*device {
	var out []*device
	for _, d := range r.devs {
		if d != nil {
			out = append(out, d)
		}
	}
	return out
}

// publish sends the device's next telemetry message at QoS 1 and records
// whether the broker acknowledged it.
func (r *run) publish(ctx context.Context, d *device) {
	c := d.client()
	if c == nil {
		return
	}
	seq := d.seq.Add(1)
	b, _ := json.Marshal(telemetry{Device: d.id, Seq: seq, Kind: "temp", Pad: r.payload})
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.PublishTelemetry(pctx, "temp", 1, b); err == nil {
		d.acked.Store(seq, struct{}{})
	} else {
		d.nack.Add(1)
	}
}

// steady: every device publishes cfg.Messages messages.
func (r *run) steady(ctx context.Context) {
	t0 := time.Now()
	var wg sync.WaitGroup
	for _, d := range r.live() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range r.cfg.Messages {
				r.publish(ctx, d)
				if r.cfg.Interval > 0 {
					select {
					case <-time.After(r.cfg.Interval):
					case <-ctx.Done():
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	r.waitDelivered(ctx, 10*time.Second)
	if el := time.Since(t0).Seconds(); el > 0 {
		r.rep.MsgsPerSec = float64(r.recv.count()) / el
	}
	r.progress("telemetry: %d messages delivered to the backend (%.0f msg/s)", r.recv.count(), r.rep.MsgsPerSec)
}

// waitDelivered waits until every acknowledged message arrived, or d.
func (r *run) waitDelivered(ctx context.Context, d time.Duration) {
	waitFor(ctx, d, func() bool { return len(r.missing(nil)) == 0 })
}

// missing lists "device/seq" acknowledged by the broker but not received,
// skipping devices in skip.
func (r *run) missing(skip map[string]bool) []string {
	var out []string
	for _, d := range r.live() {
		if skip[d.id] {
			continue
		}
		d.acked.Range(func(k, _ any) bool {
			if !r.recv.has(d.id, k.(int64)) {
				out = append(out, fmt.Sprintf("%s/%d", d.id, k.(int64)))
			}
			return true
		})
	}
	return out
}

func (r *run) account() {
	var sent int64
	for _, d := range r.live() {
		d.acked.Range(func(_, _ any) bool { sent++; return true })
	}
	r.rep.Sent = sent
	r.rep.Delivered = r.recv.count()
	r.rep.Lost = int64(len(r.missing(nil)))
}

// steadyChecks: delivery, a command round trip, and the policy.
func (r *run) steadyChecks(ctx context.Context) {
	miss := r.missing(nil)
	r.rep.check("every acknowledged QoS 1 message reached the backend", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	live := r.live()
	if len(live) == 0 {
		return
	}
	t0 := time.Now()
	target := live[0]
	r.backend.Publish("devices/"+target.id+"/commands/ping", 1, false, "ping").WaitTimeout(5 * time.Second)
	select {
	case id := <-r.recv.pongs:
		r.rep.CommandRTT = time.Since(t0)
		r.rep.check("command round trip backend -> device -> backend", id == target.id, "%s answered in %s", id, r.rep.CommandRTT.Round(time.Microsecond))
		r.progress("command round trip to %s: %s", id, r.rep.CommandRTT.Round(time.Microsecond))
	case <-time.After(10 * time.Second):
		r.rep.check("command round trip backend -> device -> backend", false, "no answer within 10s")
	}
	if len(live) < 2 {
		return
	}
	a, b := live[0], live[1]
	before := r.recv.maxSeq(b.id)
	forged, _ := json.Marshal(telemetry{Device: b.id, Seq: 1 << 40, Kind: "temp"})
	_ = a.client().Publish(ctx, "devices/"+b.id+"/telemetry/temp", 0, false, forged)
	subErr := a.client().Subscribe(ctx, "devices/"+b.id+"/commands/#", 1, func(devicesdk.Message) {})
	// A marker from a on its own topic after the forgery: once it arrives,
	// the forgery would have too.
	r.publish(ctx, a)
	r.waitDelivered(ctx, 5*time.Second)
	r.rep.check("a device publishing into another device's topic is not delivered", r.recv.maxSeq(b.id) == before,
		"%s -> devices/%s/telemetry/temp dropped by the broker's policy", a.id, b.id)
	r.rep.check("a device subscribing to another device's commands is refused", errors.Is(subErr, devicesdk.ErrSubscriptionRefused),
		"%s -> devices/%s/commands/#: %v", a.id, b.id, subErr)
	r.progress("policy: %s publishing into devices/%s/... was dropped; subscribing to its commands was refused", a.id, b.id)
}

// publishLoop publishes from every device in devs until stop is closed.
func (r *run) publishLoop(ctx context.Context, devs []*device, every time.Duration, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-ctx.Done():
					return
				case <-time.After(every):
				}
				r.publish(ctx, d)
			}
		}()
	}
	return &wg
}

// revoke revokes a fraction of the fleet mid-run and checks that each is
// cut off and stays off while the rest keep flowing.
func (r *run) revoke(ctx context.Context) error {
	live := r.live()
	k := max(1, int(float64(len(live))*r.cfg.RevokeFraction))
	if k >= len(live) && len(live) > 1 {
		k = len(live) - 1
	}
	victims, rest := live[len(live)-k:], live[:len(live)-k]
	stop := make(chan struct{})
	wg := r.publishLoop(ctx, live, 20*time.Millisecond, stop)
	time.Sleep(200 * time.Millisecond) // traffic flows before the revocation
	revokedAt := time.Now()
	seqAtReturn := map[string]int64{}
	var lat []time.Duration
	for _, v := range victims {
		t0 := time.Now()
		if _, err := r.admin.DeviceAction(ctx, v.id, "revoke", "fleetsim revoke scenario"); err != nil {
			close(stop)
			wg.Wait()
			return fmt.Errorf("revoke %s: %w", v.id, err)
		}
		seqAtReturn[v.id] = v.seq.Load()
		lat = append(lat, time.Since(t0))
		r.progress("revoked %s (call took %s)", v.id, time.Since(t0).Round(time.Microsecond))
	}
	time.Sleep(time.Second) // the rest keep publishing; victims try to
	close(stop)
	wg.Wait()
	r.waitDelivered(ctx, 10*time.Second)
	skip := map[string]bool{}
	for _, v := range victims {
		skip[v.id] = true
		off := waitFor(ctx, 5*time.Second, func() bool { return !v.client().IsConnected() })
		late := r.recv.maxSeq(v.id) > seqAtReturn[v.id]
		r.rep.check("revoked "+v.id+" is cut off and nothing it sent after the revoke is delivered", off && !late,
			"connected=%v, highest delivered seq %d, last seq sent before revoke returned %d", !off, r.recv.maxSeq(v.id), seqAtReturn[v.id])
		_, err := v.dev.Connect(ctx, devicesdk.ConnectOptions{BrokerAddr: r.cfg.BrokerAddr, ServerName: r.cfg.ServerName})
		r.rep.check("revoked "+v.id+" cannot reconnect", err != nil, "%v", err)
	}
	flowing := 0
	for _, d := range rest {
		r.recv.mu.Lock()
		for _, at := range r.recv.got[d.id] {
			if at.After(revokedAt.Add(100 * time.Millisecond)) {
				flowing++
				break
			}
		}
		r.recv.mu.Unlock()
	}
	r.rep.check("the rest of the fleet keeps flowing after the revocation", flowing == len(rest), "%d of %d devices delivered after it", flowing, len(rest))
	miss := r.missing(skip)
	r.rep.check("no acknowledged QoS 1 message of the others was lost", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	p50, p99 := percentiles(lat)
	r.progress("revocation: %d devices, revoke call p50 %s p99 %s", k, p50, p99)
	return nil
}

// restart restarts the gateway under load and checks everyone is back and
// nothing acknowledged was lost.
func (r *run) restart(ctx context.Context) error {
	live := r.live()
	stop := make(chan struct{})
	wg := r.publishLoop(ctx, live, 50*time.Millisecond, stop)
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	if err := r.gw.restart(ctx); err != nil {
		close(stop)
		wg.Wait()
		return fmt.Errorf("restart gateway: %w", err)
	}
	r.progress("gateway restarted (pid %d) in %s", r.gw.pid(), time.Since(t0).Round(time.Millisecond))
	back := waitFor(ctx, 60*time.Second, func() bool {
		for _, d := range live {
			if !d.client().IsConnected() {
				return false
			}
		}
		return r.backend.IsConnectionOpen()
	})
	r.progress("devices back after %s", time.Since(t0).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	r.waitDelivered(ctx, 20*time.Second)
	n := 0
	for _, d := range live {
		if d.client().IsConnected() {
			n++
		}
	}
	r.rep.check("every device is back after the broker restart", back, "%d/%d reconnected", n, len(live))
	miss := r.missing(nil)
	r.rep.check("no acknowledged QoS 1 message was lost across the restart", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}

// renewScenario: short certificates; every device renews at 2/3 of the
// lifetime and moves its session to the new certificate, under traffic.
func (r *run) renewScenario(ctx context.Context) error {
	live := r.live()
	stop := make(chan struct{})
	wg := r.publishLoop(ctx, live, 100*time.Millisecond, stop)
	rctx, cancel := context.WithCancel(ctx)
	var rwg sync.WaitGroup
	for _, d := range live {
		rwg.Add(1)
		go func() {
			defer rwg.Done()
			_ = d.dev.AutoRenew(rctx, devicesdk.RenewOptions{OnRenewed: func() {
				d.renew.Add(1)
				// Move the session onto the new certificate.
				nc, err := d.dev.Connect(rctx, r.connectOpts())
				if err != nil {
					return
				}
				d.mu.Lock()
				old := d.c
				d.c = nc
				d.mu.Unlock()
				old.Close()
			}})
		}()
	}
	ok := waitFor(ctx, 3*r.cfg.CertTTL, func() bool {
		for _, d := range live {
			if d.renew.Load() == 0 {
				return false
			}
		}
		return true
	})
	cancel()
	rwg.Wait()
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	r.waitDelivered(ctx, 10*time.Second)
	n := 0
	for _, d := range live {
		if d.renew.Load() > 0 {
			n++
		}
	}
	r.rep.check("every device renewed its certificate before expiry", ok, "%d/%d renewed (lifetime %s)", n, len(live), r.cfg.CertTTL)
	miss := r.missing(nil)
	r.rep.check("no acknowledged QoS 1 message was lost across renewals", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}

// storm: every device drops its connection and reconnects at once.
func (r *run) storm(ctx context.Context) error {
	live := r.live()
	for _, d := range live {
		d.client().Close()
	}
	r.progress("storm: %d devices reconnect at once", len(live))
	lat := make([]time.Duration, len(live))
	errs := make([]error, len(live))
	var wg sync.WaitGroup
	for i, d := range live {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t0 := time.Now()
			c, err := d.dev.Connect(ctx, r.connectOpts())
			if err != nil {
				errs[i] = err
				return
			}
			lat[i] = time.Since(t0)
			d.mu.Lock()
			d.c = c
			d.mu.Unlock()
		}()
	}
	wg.Wait()
	failed := 0
	for _, e := range errs {
		if e != nil {
			failed++
		}
	}
	p50, p99 := percentiles(lat)
	r.rep.check("every device reconnected in the storm", failed == 0, "%d failed; reconnect p50 %s p99 %s", failed, p50, p99)
	for _, d := range live {
		r.publish(ctx, d)
	}
	r.waitDelivered(ctx, 10*time.Second)
	miss := r.missing(nil)
	r.rep.check("traffic flows after the storm, nothing acknowledged lost", len(miss) == 0, "%d missing %v", len(miss), head(miss))
	return nil
}

func head(s []string) []string {
	slices.Sort(s)
	if len(s) > 5 {
		return s[:5]
	}
	return s
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
	s := slices.DeleteFunc(slices.Clone(ds), func(d time.Duration) bool { return d == 0 })
	if len(s) == 0 {
		return 0, 0
	}
	slices.Sort(s)
	return s[len(s)*50/100], s[min(len(s)-1, len(s)*99/100)]
}

// WriteTable prints the report for humans.
func (r *Report) WriteTable(w io.Writer) {
	fmt.Fprintf(w, "\nfleetsim report: scenario %s (%s)\n", r.Scenario, r.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(w, "  devices            %d enrolled, %d connected of %d (keys: %s)\n", r.Enrolled, r.Connected, r.Devices, r.TPM)
	fmt.Fprintf(w, "  enrollment         p50 %s  p99 %s\n", r.EnrollP50.Round(time.Microsecond), r.EnrollP99.Round(time.Microsecond))
	fmt.Fprintf(w, "  connect (mTLS)     p50 %s  p99 %s  (%.0f/s one at a time)\n", r.ConnectP50.Round(time.Microsecond), r.ConnectP99.Round(time.Microsecond), r.ConnectsPerSec)
	if r.GatewayRSSAfterKB > 0 {
		fmt.Fprintf(w, "  gateway memory     %d KB -> %d KB with %d connections: %.1f KB per connection\n", r.GatewayRSSBeforeKB, r.GatewayRSSAfterKB, r.Connected, r.RSSPerConnectionKB)
	}
	fmt.Fprintf(w, "  telemetry (QoS 1)  %d acknowledged, %d delivered, %d lost; %.0f msg/s\n", r.Sent, r.Delivered, r.Lost, r.MsgsPerSec)
	fmt.Fprintf(w, "  first delivery     %s after start\n", r.FirstDelivery.Round(time.Millisecond))
	fmt.Fprintln(w, "  checks:")
	for _, c := range r.Checks {
		mark := "PASS"
		if !c.Passed {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "    [%s] %s (%s)\n", mark, c.Name, c.Detail)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
}

// rssKB reads a process's resident set size from /proc.
func rssKB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}

// runtimeGC is a pause so the gateway settles before the baseline is read.
func runtimeGC() { time.Sleep(300 * time.Millisecond) }
