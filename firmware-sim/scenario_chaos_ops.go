package sim

// The chaos scenario's operator actions beside revocations: suspensions
// (resumed through another node) and token redemptions during the faults,
// each token redeemed at once through two nodes; and the faults that act
// on the whole cluster (partitions through the route relays, every node
// SIGKILLed at once).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	adminclient "github.com/fleetgate/fleetgate/operator/client"
)

// TokenStat is one token redeemed through two nodes at once.
type TokenStat struct {
	Device string   `json:"device"`
	Nodes  [2]int   `json:"nodes"`   // node indexes the two redemptions went to
	Certs  int      `json:"certs"`   // certificates issued (answers with one)
	Serial []string `json:"serials"` // their serials
	// Refused: answers token_used (the other won) or conflict; Errors:
	// anything else (a node down, no quorum): no certificate either.
	Refused int      `json:"refused"`
	Errors  []string `json:"errors,omitempty"`
	// Registry is the device's serial in the registry listing at the end
	// ("" if not listed).
	Registry string `json:"registry_serial,omitempty"`
}

// throughAny runs call with node i's operator client, or the next node's
// if that one does not answer (it may be down: operators retry
// elsewhere), for 60 s at most; it returns the node that answered.
func (r *run) throughAny(ctx context.Context, i int, what string, call func(context.Context, *adminclient.Client) error) (int, error) {
	var errs []string
	deadline := time.Now().Add(60 * time.Second)
	for k := 0; time.Now().Before(deadline) && ctx.Err() == nil; k++ {
		j := (i + k) % len(r.cl.nodes)
		if r.cl.nodes[j].running() == nil || r.cl.nodes[j].isPaused() {
			time.Sleep(50 * time.Millisecond)
			continue
		}
		admin, err := r.adminOf(j)
		if err == nil {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err = call(cctx, admin)
			cancel()
			if err == nil {
				return j, nil
			}
		}
		errs = append(errs, fmt.Sprintf("node%d: %v", j+1, err))
		time.Sleep(200 * time.Millisecond)
	}
	return -1, fmt.Errorf("%s: %s", what, strings.Join(head(errs), "; "))
}

// actionThroughAny runs a device action (revoke, suspend, resume) through
// node i's API, or the next node's (throughAny).
func (r *run) actionThroughAny(ctx context.Context, i int, id, action string) (int, error) {
	return r.throughAny(ctx, i, action+" "+id, func(ctx context.Context, admin *adminclient.Client) error {
		_, err := admin.DeviceAction(ctx, id, action, "fleetsim chaos scenario")
		return err
	})
}

// suspendAndResume suspends d through node i (or the next that answers),
// checks that a fresh connection of d is refused by a running node while
// it is suspended, and resumes it through another node after hold. It
// reports whether the fresh connection was accepted (a failure).
func (r *run) suspendAndResume(ctx context.Context, i int, d *device, hold time.Duration, logf func(string, ...any)) (accepted bool, err error) {
	j, err := r.actionThroughAny(ctx, i, d.id, "suspend")
	if err != nil {
		return false, err
	}
	logf("%s suspended through node%d", d.id, j+1)
	until := time.Now().Add(hold)
	// One fresh connection while suspended, to a node that runs.
	for k := range r.cl.nodes {
		nd := r.cl.nodes[(j+k)%len(r.cl.nodes)]
		if nd.running() == nil || nd.isPaused() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, cerr := d.dev.Connect(cctx, devicesdk.ConnectOptions{BrokerAddr: nd.addrs.MQTT, ServerName: r.cfg.ServerName})
		cancel()
		if cerr == nil {
			c.Close()
			accepted = true
			logf("%s ACCEPTED by %s while suspended", d.id, nd.name)
		}
		break
	}
	sleepUntil(ctx, until)
	k, err := r.actionThroughAny(ctx, j+1, d.id, "resume")
	if err != nil {
		return accepted, err
	}
	logf("%s resumed through node%d", d.id, k+1)
	return accepted, nil
}

// redeemTwice mints a bootstrap token for a new device through node i (or
// the next that answers) and redeems it at once through node i and node
// i+1, each with a key of its own, as two devices racing with one token
// would.
func (r *run) redeemTwice(ctx context.Context, i, n int) *TokenStat {
	id := fmt.Sprintf("%s-t%03d", r.cfg.Prefix, n+1)
	nodes := len(r.cl.nodes)
	ts := &TokenStat{Device: id, Nodes: [2]int{i, (i + 1) % nodes}}
	var tok string
	if _, err := r.throughAny(ctx, i, "token for "+id, func(ctx context.Context, admin *adminclient.Client) error {
		resp, err := admin.CreateToken(ctx, api.TokenCreateRequest{DeviceID: id, Group: r.cfg.Group, TTL: time.Hour})
		if err == nil {
			tok = resp.Token
		}
		return err
	}); err != nil {
		ts.Errors = append(ts.Errors, err.Error())
		return ts
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for k, ni := range ts.Nodes {
		nd := r.cl.nodes[ni]
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := r.redeem(ctx, nd, fmt.Sprintf("%s-%c", id, 'a'+k), id, tok, func(serial string) {
				mu.Lock()
				ts.Certs++
				ts.Serial = append(ts.Serial, serial)
				mu.Unlock()
			})
			if err == nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			var ae *api.Error
			if errors.As(err, &ae) && (ae.Code == "token_used" || ae.Code == "conflict") {
				ts.Refused++
			} else {
				ts.Errors = append(ts.Errors, fmt.Sprintf("redeem through %s: %v", nd.name, err))
			}
		}()
	}
	wg.Wait()
	return ts
}

// redeem enrolls device id with tok through nd's API, with a fresh key in
// dir; got hears the serial of a certificate issued.
func (r *run) redeem(ctx context.Context, nd *clusterNode, dir, id, tok string, got func(string)) error {
	dir = filepath.Join(r.cfg.WorkDir, dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		return err
	}
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: "https://" + nd.addrs.API, RootCAs: r.fleet.cfg.roots})
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := dev.EnrollWithToken(cctx, tok); err != nil {
		return err
	}
	if l := dev.Leaf(); l != nil {
		got(l.SerialNumber.Text(16))
	} else {
		got("?")
	}
	return nil
}

// registrySerial is device id's certificate serial in the registry
// listing of the first node that answers ("" if none lists it).
func (r *run) registrySerial(ctx context.Context, id string) string {
	for i := range r.cl.nodes {
		admin, err := r.adminOf(i)
		if err != nil {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		d, err := admin.Device(cctx, id)
		cancel()
		if err == nil {
			return d.Serial
		}
	}
	return ""
}

// allDown SIGKILLs every node at once and restarts them all after hold.
func (r *run) allDown(ctx context.Context, hold time.Duration, logf func(string, ...any)) error {
	var wg sync.WaitGroup
	var pids []string
	for _, nd := range r.cl.nodes {
		pids = append(pids, fmt.Sprint(nd.pid()))
		wg.Add(1)
		go func() { defer wg.Done(); _ = nd.kill() }()
	}
	wg.Wait()
	logf("every node killed (pids %s)", strings.Join(pids, ", "))
	time.Sleep(hold)
	for i, nd := range r.cl.nodes {
		if err := r.cl.start(ctx, nd); err != nil {
			return fmt.Errorf("restart %s: %w", nd.name, err)
		}
		logf("node%d restarted (pid %d)", i+1, nd.pid())
	}
	return nil
}
