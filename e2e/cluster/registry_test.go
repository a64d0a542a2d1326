package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/fleet"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

// The registry across nodes (docs/cluster.md, "Registry across nodes"),
// through the real APIs: a device enrolled through node 1 renews through
// node 2, node 3 lists it with its renewed certificate and shows its
// audit, and the renewed certificate connects to node 3.
func TestClusterRegistryRecordsThroughAnyNode(t *testing.T) {
	c := testenv.StartCluster(t, 3, nil)
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	ctx := context.Background()
	const id = "reg-any"
	dir := filepath.Join(t.TempDir(), id)
	key, err := devicesdk.NewSoftwareKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	through := func(g *testenv.Gateway) *devicesdk.Device {
		d, err := devicesdk.New(devicesdk.Config{DeviceID: id, Key: key, StateDir: dir, EnrollURL: g.URL(), RootCAs: g.Roots()})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	d1 := through(n1)
	if err := d1.EnrollWithToken(ctx, n1.Token(t, id, "fleet", time.Hour)); err != nil {
		t.Fatal(err)
	}
	first := fleet.SerialString(d1.Leaf().SerialNumber)

	d2 := through(n2)
	// Node 2's directory learns of the certificate through the feed.
	testenv.Eventually(t, 10*time.Second, func() error { return d2.Renew(ctx) })
	renewed := fleet.SerialString(d2.Leaf().SerialNumber)
	if renewed == first {
		t.Fatal("renewal through node 2 kept the certificate")
	}

	dev, err := n3.Admin.Device(ctx, id)
	if err != nil || dev.Serial != renewed || dev.State != "active" {
		t.Fatalf("device through node 3: %+v %v, want active with %s", dev, err, renewed)
	}
	devs, err := n3.Admin.Devices(ctx)
	if err != nil {
		t.Fatal(err)
	}
	listed := false
	for _, d := range devs {
		listed = listed || d.ID == id
	}
	if !listed {
		t.Fatalf("%s not listed through node 3: %+v", id, devs)
	}
	audit, err := n3.Admin.Audit(ctx, id, 0)
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, a := range audit {
		actions = append(actions, a.Action+"/"+a.Outcome)
	}
	if got := fmt.Sprint(actions); got != "[renew/ok enroll.token/ok token.create/ok]" { // newest first
		t.Fatalf("audit of %s through node 3: %s", id, got)
	}
	testenv.Eventually(t, 10*time.Second, func() error {
		_, err := n3.MQTT(t, id, deviceCert(t, through(n3)))
		return err
	})
}
