package deploy_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/fleetproc"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

const haproxyFile = "haproxy.cfg"

// haproxyBin returns haproxy's path, or skips (fails under
// FLEETGATE_REQUIRE_TOOLS: scripts/install-deps.sh installs it).
func haproxyBin(t *testing.T) string {
	t.Helper()
	return tool(t, "haproxy")
}

// The shipped file, as it is, is a valid HAProxy configuration.
func TestHAProxyConfigValid(t *testing.T) {
	bin := haproxyBin(t)
	out, err := exec.Command(bin, "-c", "-f", haproxyFile).CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c -f %s: %v\n%s", haproxyFile, err, out)
	}
	if strings.Contains(string(out), "[WARNING]") || strings.Contains(string(out), "[ALERT]") {
		t.Fatalf("haproxy -c -f %s warns:\n%s", haproxyFile, out)
	}
}

var (
	serverLine = regexp.MustCompile(`(?m)^(\s*server (node\d)) 10\.0\.0\.\d:(8883|8443)(.*)$`)
	bindLine   = regexp.MustCompile(`(?m)^(\s*bind) :(8883|8443)$`)
)

// renderHAProxy is the shipped file with this test's addresses: HAProxy's
// ports on loopback, node i's MQTT and API where it listens, and the health
// check on its metrics address. Nothing else changes.
func renderHAProxy(t *testing.T, src string, lb map[string]string, nodes map[string]*testenv.Gateway) string {
	t.Helper()
	out := bindLine.ReplaceAllStringFunc(src, func(l string) string {
		m := bindLine.FindStringSubmatch(l)
		return m[1] + " " + lb[m[2]]
	})
	n := 0
	out = serverLine.ReplaceAllStringFunc(out, func(l string) string {
		m := serverLine.FindStringSubmatch(l)
		g := nodes[m[2]]
		addr := g.Addrs.MQTT
		if m[3] == "8443" {
			addr = g.Addrs.API
		}
		host, port, err := net.SplitHostPort(g.Addrs.Metrics)
		if err != nil {
			t.Fatal(err)
		}
		n++
		return fmt.Sprintf("%s %s%s addr %s port %s", m[1], addr, m[4], host, port)
	})
	if n != 6 {
		t.Fatalf("%s: %d server lines rewritten, want 6 (3 MQTT, 3 API)", haproxyFile, n)
	}
	return strings.Replace(out, "maxconn 200000", "maxconn 1000", 1)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// connectionsOf is node g's count of connected devices (its metric).
func connectionsOf(t *testing.T, g *testenv.Gateway) string {
	for _, l := range strings.Split(g.Metrics(t), "\n") {
		if strings.HasPrefix(l, `fleetgate_broker_connections{role="device"}`) {
			return strings.TrimSpace(strings.TrimPrefix(l, `fleetgate_broker_connections{role="device"}`))
		}
	}
	return "0"
}

// HAProxy, with the shipped file, in front of three cluster nodes on
// loopback: a device enrolls through HAProxy's API port and connects
// through its MQTT port (TLS passes through: the node sees the device's
// certificate), publishes QoS 1, and a service on a node receives it.
// Then the device's node is cut off from the others: it fails closed
// (/readyz 503), HAProxy marks it down and closes its connections, and the
// device reconnects through HAProxy to a node that is current.
func TestHAProxyInFrontOfThreeNodes(t *testing.T) {
	bin := haproxyBin(t)
	src, err := os.ReadFile(haproxyFile)
	if err != nil {
		t.Fatal(err)
	}
	c := testenv.StartCluster(t, 3, nil)
	nodes := map[string]*testenv.Gateway{"node1": c.Nodes[0], "node2": c.Nodes[1], "node3": c.Nodes[2]}
	lb := map[string]string{"8883": freeAddr(t), "8443": freeAddr(t)}
	cfgPath := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(renderHAProxy(t, string(src), lb, nodes)), 0o644); err != nil {
		t.Fatal(err)
	}
	hp, err := fleetproc.Spawn(bin, []string{"-db", "-f", cfgPath}, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		err := hp.Stop(5 * time.Second) // SIGTERM: haproxy exits with that signal
		if t.Failed() {
			t.Logf("haproxy (pid %d): %v; its log:\n%s", hp.PID, err, hp.Log())
		}
	})
	ctx := context.Background()

	// Enrollment through HAProxy (node 1 takes the API; the others are its
	// backups).
	g1 := c.Nodes[0]
	key, err := devicesdk.NewSoftwareKey(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dev, err := devicesdk.New(devicesdk.Config{DeviceID: "lb-dev", Key: key, StateDir: t.TempDir(),
		EnrollURL: "https://localhost:" + port(t, lb["8443"]), RootCAs: g1.Roots()})
	if err != nil {
		t.Fatal(err)
	}
	tok := g1.Token(t, "lb-dev", "fleet", time.Hour)
	testenv.Eventually(t, 30*time.Second, func() error { return dev.EnrollWithToken(ctx, tok) })

	// A service on node 2 subscribed to the device's telemetry.
	svc := g1.Service(t, "lb-backend")
	got := make(chan string, 16)
	// A persistent session that reconnects: on a loaded machine node 2
	// may itself go stale for a moment and close its sessions past the
	// second bound; what was routed meanwhile is replayed.
	sub, err := c.Nodes[1].MQTT(t, "lb-backend", &svc, func(o *paho.ClientOptions) {
		o.SetCleanSession(false).SetAutoReconnect(true).SetMaxReconnectInterval(time.Second)
	})
	if err != nil {
		t.Fatal(err)
	}
	if tk := sub.Subscribe("devices/lb-dev/telemetry/#", 1, func(_ paho.Client, m paho.Message) { got <- string(m.Payload()) }); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}

	// The device through HAProxy's MQTT port, once HAProxy's checks have
	// marked the nodes up.
	var cl *devicesdk.Client
	testenv.Eventually(t, 30*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var err error
		cl, err = dev.Connect(cctx, devicesdk.ConnectOptions{BrokerAddr: lb["8883"], ServerName: "localhost", AutoReconnect: true, MaxReconnectInterval: time.Second})
		return err
	})
	t.Cleanup(cl.Close)
	publish := func(msg string) {
		t.Helper()
		testenv.Eventually(t, 30*time.Second, func() error {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			return cl.PublishTelemetry(pctx, "temp", 1, []byte(msg))
		})
		for {
			select {
			case m := <-got:
				if m == msg {
					return
				}
			case <-time.After(20 * time.Second):
				t.Fatalf("%q published through HAProxy did not reach the service on node 2", msg)
			}
		}
	}
	publish("through-haproxy")

	// Which node HAProxy chose: the one counting a connected device.
	on := -1
	for i, g := range c.Nodes {
		if connectionsOf(t, g) == "1" {
			on = i
		}
	}
	if on < 0 {
		t.Fatal("no node counts the device's connection")
	}
	t.Logf("HAProxy sent the device to node%d; cutting that node off", on+1)
	c.Mesh.Cut(on)
	t.Cleanup(func() { c.Mesh.Heal(on) })
	testenv.Eventually(t, 30*time.Second, func() error {
		for i, g := range c.Nodes {
			if i != on && connectionsOf(t, g) == "1" && cl.IsConnected() {
				return nil
			}
		}
		return fmt.Errorf("device not yet on another node (node%d stale: /readyz %d)", on+1, c.Nodes[on].Ready())
	})
	if c.Nodes[1].Ready() == 200 && on != 1 {
		publish("after-failover")
	}
}

func port(t *testing.T, addr string) string {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
