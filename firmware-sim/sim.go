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
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	adminclient "github.com/fleetgate/fleetgate/operator/client"
)

// run is one simulation: its configuration, report, the gateway and
// fleet it started, the backend and the devices.
type run struct {
	cfg     Config
	rep     *Report
	admin   *adminclient.Client
	fleet   *fleet
	gw      *gatewayProc
	cl      *clusterProcs
	adminMu sync.Mutex
	admins  map[int]*adminclient.Client // by node index
	// onBackend, if set, hears the backend service's connection events.
	onBackend atomic.Pointer[func(string)]
	// mqttAddrs are the cluster nodes' MQTT addresses, node 1 first.
	mqttAddrs []string
	recv      *receiver
	backend   paho.Client
	// backendAcks is the backend's paho store: it tells which of its
	// commands the broker acknowledged (devicesdk/acks.go).
	backendAcks *devicesdk.AckStore
	devs        []*device
	payload     []byte
	progress    func(string, ...any)
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
	case ScenarioFailover:
		err = r.failover(ctx)
	case ScenarioChaos:
		err = r.chaos(ctx)
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
	if r.cl != nil {
		r.cl.Close()
	}
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
