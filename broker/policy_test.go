package broker_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	paho "github.com/eclipse/paho.mqtt.golang"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

const labPolicy = `rules:
  - name: lab-devices-only
    roles: [device]
    groups: [lab]
    allow: [publish]
    topics: ["devices/{id}/telemetry/#"]
  - name: site-alerts
    roles: [device]
    allow: [subscribe]
    topics: ["sites/{tag:site}/alerts/#"]
  - name: svc
    roles: [service]
    allow: [subscribe]
    topics: ["devices/#"]
`

func TestPolicyReloadAndAttributeChangesApplyWithoutReconnect(t *testing.T) {
	dir := testenv.Init(t)
	policyFile := filepath.Join(dir, server.PolicyFileName)
	if err := os.WriteFile(policyFile, []byte(labPolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	g := testenv.Start(t, testenv.Options{DataDir: dir})
	ctx := context.Background()
	svcCert := g.Service(t, "backend")
	svc, err := g.MQTT(t, "backend", &svcCert)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]bool{}
	svc.Subscribe("devices/#", 0, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		seen[string(m.Payload())] = true
		mu.Unlock()
	}).Wait()
	n := 0
	// allowed publishes a unique payload and reports whether the broker
	// delivered it (true) or counted a publish denial (false).
	allowed := func(c *devicesdk.Client) bool {
		t.Helper()
		n++
		payload := fmt.Sprintf("m-%d", n)
		before := deniedPublishes(t, g)
		if err := c.Publish(ctx, "devices/p-1/telemetry/t", 0, false, []byte(payload)); err != nil {
			t.Fatal(err)
		}
		var result bool
		testenv.Eventually(t, 10*time.Second, func() error {
			mu.Lock()
			ok := seen[payload]
			mu.Unlock()
			if ok {
				result = true
				return nil
			}
			if deniedPublishes(t, g) > before {
				result = false
				return nil
			}
			return errors.New("neither delivered nor denied yet")
		})
		return result
	}
	d := g.EnrollDevice(t, "p-1", "lab")
	c, err := d.Connect(ctx, brokerOpts(g))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A tag placeholder: no tag yet, so no subscription.
	if err := c.Subscribe(ctx, "sites/berlin/alerts/#", 1, func(devicesdk.Message) {}); !errors.Is(err, devicesdk.ErrSubscriptionRefused) {
		t.Fatalf("subscribe without tag: %v", err)
	}
	if _, err := g.Admin.UpdateDevice(ctx, "p-1", api.DeviceUpdateRequest{Tags: map[string]string{"site": "berlin"}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Subscribe(ctx, "sites/berlin/alerts/#", 1, func(devicesdk.Message) {}); err != nil {
		t.Fatalf("subscribe after tagging, same connection: %v", err)
	}
	// A bad file is refused with its errors and line numbers; the old
	// policy stays in force (lab devices still publish).
	if err := os.WriteFile(policyFile, []byte("rules:\n  - name: broken\n    allow: [write]\n    topics: ['a/#/b']\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = g.Admin.ReloadPolicy(ctx)
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != "policy_invalid" || !strings.Contains(ae.Message, "policy.yaml:2") {
		t.Fatalf("broken policy reload: %v", err)
	}
	if !allowed(c) {
		t.Fatal("old policy no longer in force after a refused reload")
	}
	// Moving the device out of the lab group applies at its next publish.
	if _, err := g.Admin.UpdateDevice(ctx, "p-1", api.DeviceUpdateRequest{Group: "prod"}); err != nil {
		t.Fatal(err)
	}
	if allowed(c) {
		t.Fatal("group change did not apply without reconnect")
	}
	// A good file reloads.
	if err := os.WriteFile(policyFile, []byte(strings.Replace(labPolicy, "groups: [lab]", "groups: [lab, prod]", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := g.Admin.ReloadPolicy(ctx); err != nil || n != 3 {
		t.Fatalf("reload: %d %v", n, err)
	}
	if !allowed(c) {
		t.Fatal("reloaded policy not in force")
	}
	if !c.IsConnected() {
		t.Fatal("reloads dropped the session")
	}
}

func deniedPublishes(t *testing.T, g *testenv.Gateway) int {
	t.Helper()
	for _, l := range strings.Split(g.Metrics(t), "\n") {
		if strings.HasPrefix(l, `fleetgate_broker_acl_denied_total{direction="publish"} `) {
			v, _ := strconv.Atoi(strings.Fields(l)[1])
			return v
		}
	}
	return 0
}
