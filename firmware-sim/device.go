package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
)

// device is one simulated device at run time.
type device struct {
	idx   int // its place in the fleet: node idx mod N is its first broker
	id    string
	dev   *devicesdk.Device
	mu    sync.Mutex
	c     *devicesdk.Client
	seq   atomic.Int64 // last sequence number handed to Publish
	acked sync.Map     // seq -> time.Time: when the broker acknowledged it
	nack  atomic.Int64
	renew atomic.Int64
	// connects counts the device's successful connections; connectedAt is
	// the latest one (unix ns).
	connects    atomic.Int64
	connectedAt atomic.Int64
	// cmds: the commands the device received, by name (the topic's last
	// level), as the device saw them.
	cmds sync.Map
}

// got reports whether the device received the command named cmd.
func (d *device) got(cmd string) bool {
	_, ok := d.cmds.Load(cmd)
	return ok
}

func (d *device) onConnect() {
	d.connectedAt.Store(time.Now().UnixNano())
	d.connects.Add(1)
}

// broker is where the device is (or was last) connected; "" if unknown.
func (d *device) broker() string {
	if c := d.client(); c != nil {
		return c.Broker()
	}
	return ""
}

func (d *device) client() *devicesdk.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.c
}

func (r *run) commandHandler(d *device) func(devicesdk.Message) {
	return func(m devicesdk.Message) {
		d.cmds.Store(path.Base(m.Topic), time.Now())
		b, _ := json.Marshal(telemetry{Device: d.id, Kind: "pong", Cmd: path.Base(m.Topic)})
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
		d.acked.Store(seq, time.Now())
	} else {
		d.nack.Add(1)
	}
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

// publishLoop publishes from every device in devs, one message each every
// interval, until the returned function is called; it returns once every
// publisher has stopped.
func (r *run) publishLoop(ctx context.Context, devs []*device, every time.Duration) (stop func()) {
	var wg sync.WaitGroup
	done := make(chan struct{})
	for _, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				case <-ctx.Done():
					return
				case <-time.After(every):
				}
				r.publish(ctx, d)
			}
		}()
	}
	return func() {
		close(done)
		wg.Wait()
	}
}
