package sim

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/enroll/ca"
	adminclient "github.com/fleetgate/fleetgate/operator/client"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// connectOpts are device i's: persistent sessions with auto-reconnect,
// what a real device runs. In a cluster, device i's first broker is node
// i mod N; the other nodes follow, in an order that differs from device
// to device, so that the devices of a dead node spread over the others
// (as a load balancer would spread them).
func (r *run) connectOpts(i int) devicesdk.ConnectOptions {
	o := devicesdk.ConnectOptions{BrokerAddr: r.cfg.BrokerAddr, ServerName: r.cfg.ServerName, AutoReconnect: true, MaxReconnectInterval: time.Second, KeepAlive: 30 * time.Second}
	if n := len(r.mqttAddrs); n > 0 {
		o.BrokerAddr = r.mqttAddrs[i%n]
		for k := range n - 1 {
			o.OtherBrokers = append(o.OtherBrokers, r.mqttAddrs[(i+1+(k+i/n)%(n-1))%n])
		}
	}
	return o
}

// deviceOpts are d's connect options, with its connection times recorded.
func (r *run) deviceOpts(d *device) devicesdk.ConnectOptions {
	o := r.connectOpts(d.idx)
	o.OnConnect = d.onConnect
	return o
}

func (r *run) setup(ctx context.Context) error {
	cfg := &r.cfg
	if cfg.Cluster > 0 {
		if err := r.setupCluster(ctx); err != nil {
			return err
		}
	} else if cfg.Spawn {
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
	var backendAddr atomic.Value
	bopts := paho.NewClientOptions().AddBroker("tls://" + cfg.BrokerAddr)
	for _, a := range r.mqttAddrs[min(1, len(r.mqttAddrs)):] {
		bopts.AddBroker("tls://" + a) // node 1 first, then the others
	}
	r.backendAcks = devicesdk.NewAckStore()
	r.backend = paho.NewClient(bopts.SetClientID(svcName).SetStore(r.backendAcks).
		SetTLSConfig(&tls.Config{RootCAs: cfg.roots, ServerName: cfg.ServerName, Certificates: []tls.Certificate{svcCert}, MinVersion: tls.VersionTLS13}).
		SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(time.Second).SetOrderMatters(false).
		SetDefaultPublishHandler(r.recv.handle).
		SetConnectionAttemptHandler(func(u *url.URL, c *tls.Config) *tls.Config {
			backendAddr.Store(u.Host)
			return c
		}).
		SetOnConnectHandler(func(paho.Client) {
			if f := r.onBackend.Load(); f != nil {
				a, _ := backendAddr.Load().(string)
				(*f)("connected to " + a)
			}
		}).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			if f := r.onBackend.Load(); f != nil {
				(*f)(fmt.Sprintf("connection lost: %v", err))
			}
		}))
	if t := r.backend.Connect(); !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		return fmt.Errorf("backend connect: %v", t.Error())
	}
	if t := r.backend.Subscribe("devices/+/telemetry/#", 1, nil); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return fmt.Errorf("backend subscribe: %v", t.Error())
	}
	r.progress("backend service %s connected to %s, subscribed to devices/+/telemetry/#", svcName, cfg.BrokerAddr)

	var tdevs []*tpmDevice
	if cfg.TPM == TPMSwtpm {
		t0 := time.Now()
		if tdevs, err = r.fleet.manufacture(ctx, cfg.Devices, r.progress); err != nil {
			return err
		}
		r.rep.Manufacture = time.Since(t0)
		if cfg.OnFleet != nil {
			cfg.OnFleet(r.fleet.SwtpmPIDs())
		}
	}
	r.devs = make([]*device, cfg.Devices)
	if r.gw != nil {
		runtimeGC()
		r.rep.GatewayRSSBeforeKB = rssKB(r.gw.pid())
	}
	if r.cl != nil {
		runtimeGC()
		r.rep.Nodes = r.nodeStats()
	}
	// Devices enroll and connect a few at a time, as a fleet powered on
	// together does (each device is sequential: its TPM takes one command
	// at a time).
	var (
		mu                sync.Mutex
		enrollLat, connLt []time.Duration
		errs              []error
		done              atomic.Int64
		wg                sync.WaitGroup
	)
	method := "token"
	if cfg.TPM == TPMSwtpm {
		method = "TPM attestation"
	}
	next := make(chan int)
	t0 := time.Now()
	for range min(setupParallel, cfg.Devices) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				dv, el, cl, err := r.enrollAndConnect(ctx, i, tdevs)
				mu.Lock()
				if el > 0 {
					enrollLat = append(enrollLat, el)
					r.rep.Enrolled++
				}
				if err != nil {
					errs = append(errs, err)
				}
				if dv != nil {
					connLt = append(connLt, cl)
					r.rep.Connected++
					r.devs[i] = dv
				}
				mu.Unlock()
				if n := done.Add(1); cfg.Devices <= 20 || n%50 == 0 {
					if dv != nil {
						r.progress("device %s enrolled (%s) and connected to %s as %s [%d/%d]", dv.id, method, dv.broker(), dv.dev.Leaf().URIs[0], n, cfg.Devices)
					}
				}
			}
		}()
	}
feed:
	for i := range r.devs {
		select {
		case next <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	r.rep.EnrollConnect = time.Since(t0)
	if r.gw != nil && r.rep.Connected > 0 {
		r.rep.GatewayRSSAfterKB = rssKB(r.gw.pid())
		r.rep.RSSPerConnectionKB = float64(r.rep.GatewayRSSAfterKB-r.rep.GatewayRSSBeforeKB) / float64(r.rep.Connected)
	}
	if r.cl != nil && r.rep.Connected > 0 {
		r.nodeMemory()
	}
	if r.rep.EnrollConnect > 0 {
		r.rep.ConnectsPerSec = float64(r.rep.Connected) / r.rep.EnrollConnect.Seconds()
	}
	r.rep.EnrollP50, r.rep.EnrollP99 = percentiles(enrollLat)
	r.rep.ConnectP50, r.rep.ConnectP99 = percentiles(connLt)
	for _, e := range errs {
		r.rep.Errors = append(r.rep.Errors, e.Error())
	}
	r.rep.check("every device enrolled and connected", r.rep.Connected == cfg.Devices,
		"%d/%d connected; %d errors", r.rep.Connected, cfg.Devices, len(errs))
	return nil
}

// setupParallel is how many devices enroll and connect at once.
const setupParallel = 8

// enrollAndConnect enrolls device i and connects it with its command
// subscription. el is the enrollment's duration (0 if it failed), cl the
// connection's; dv is nil unless it connected.
func (r *run) enrollAndConnect(ctx context.Context, i int, tdevs []*tpmDevice) (dv *device, el, cl time.Duration, err error) {
	id := r.fleet.id(i)
	t0 := time.Now()
	var d *devicesdk.Device
	if r.cfg.TPM == TPMSwtpm {
		d, err = r.fleet.enrollTPM(ctx, tdevs[i])
	} else {
		d, err = r.fleet.enrollToken(ctx, id)
	}
	if err != nil {
		return nil, 0, 0, err
	}
	el = time.Since(t0)
	dv = &device{idx: i, id: id, dev: d}
	dv.seq.Store(-1)
	r.answerCommands(dv)
	t1 := time.Now()
	c, err := d.Connect(ctx, r.deviceOpts(dv))
	if err != nil {
		return nil, el, 0, fmt.Errorf("%s: connect: %w", id, err)
	}
	if err := c.SubscribeCommands(ctx, 1, r.commandHandler(dv)); err != nil {
		c.Close()
		return nil, el, 0, fmt.Errorf("%s: subscribe: %w", id, err)
	}
	dv.c = c
	return dv, el, time.Since(t1), nil
}

// rssKB is a process's resident set size in KB (0 if unknown).
func rssKB(pid int) int64 {
	b, _ := fleetproc.RSS(pid)
	return b / 1024
}

// runtimeGC is a pause so the gateway settles before the baseline is read.
func runtimeGC() { time.Sleep(300 * time.Millisecond) }
