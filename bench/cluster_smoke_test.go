package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// TestClusterScenariosSmoke runs the cluster scenarios a-f once with tiny
// sizes against real processes: 3 fleetgate nodes, 3 nats-server nodes and
// single-node fleetgate, built from this tree. It takes a few minutes on
// the shared machine, so it runs only with FLEETGATE_BENCH_CLUSTER=1 (and
// never with -short):
//
//	FLEETGATE_BENCH_CLUSTER=1 go test -count=1 -run TestClusterScenariosSmoke -v ./bench/
//
// It checks that every scenario measured every broker it runs, that a
// SIGKILLed node's devices all came back with no acknowledged QoS 1
// message lost, that QoS 1 fan-in lost nothing, and that revoked devices'
// resumed sessions were refused.
func TestClusterScenariosSmoke(t *testing.T) {
	if testing.Short() || os.Getenv("FLEETGATE_BENCH_CLUSTER") != "1" {
		t.Skip("set FLEETGATE_BENCH_CLUSTER=1: starts 7 broker processes for minutes")
	}
	bin := t.TempDir()
	for _, pkg := range []string{"github.com/fleetgate/fleetgate/cmd/fleetgate", "github.com/nats-io/nats-server/v2"} {
		out, err := exec.Command("go", "build", "-o", bin+"/", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	NATSBin = filepath.Join(bin, "nats-server")
	e := &Env{Work: t.TempDir(), FleetgateBin: filepath.Join(bin, "fleetgate"), Logf: t.Logf}
	cfg := DefaultConfig()
	cfg.Scenarios, cfg.ClusterReps, cfg.ClusterFor = ClusterScenarios, 1, time.Second
	cfg.Publishers, cfg.ConnectWorkers, cfg.FailoverDevices, cfg.ClusterRevoke, cfg.ClusterRate = 12, 6, 12, 4, 300
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := Run(ctx, e, cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range res.Errors {
		t.Log("error recorded:", e)
	}
	all := []string{FleetgateCluster, NATSCluster, "fleetgate"}
	want := []struct {
		scn, metric string
		brokers     []string
	}{
		{SA, "broker CPU µs/conn", all},
		{SB, "broker CPU µs/msg", all},
		{SC, "broker CPU µs/msg", all},
		{SD, "delivery p99 ms", all},
		{SE, "revoke→closed p99 ms", []string{FleetgateCluster, "fleetgate"}},
		{SF, "QoS 1 acked, lost", []string{FleetgateCluster, NATSCluster}},
	}
	for _, w := range want {
		m := res.metric(w.scn, w.metric)
		for _, b := range w.brokers {
			if len(m.Values[b]) != 1 {
				t.Errorf("%s %s: %s has %d values, want 1", w.scn, w.metric, b, len(m.Values[b]))
			}
		}
	}
	for _, b := range []string{FleetgateCluster, NATSCluster} {
		if v := res.metric(SF, "devices back (of n)").Values[b]; len(v) != 1 || v[0] != float64(cfg.FailoverDevices) {
			t.Errorf("%s: devices back after the SIGKILL %v, want %d", b, v, cfg.FailoverDevices)
		}
		if v := res.metric(SF, "QoS 1 acked, lost").Values[b]; len(v) != 1 || v[0] != 0 {
			t.Errorf("%s: acknowledged QoS 1 lost when a node died: %v", b, v)
		}
	}
	for _, b := range all {
		if v := res.metric(SC, "lost").Values[b]; len(v) != 1 || v[0] != 0 {
			t.Errorf("%s: QoS 1 fan-in lost %v", b, v)
		}
	}
	if v := res.metric(SE, "revoked, resumption admitted").Values[FleetgateCluster]; len(v) != 1 || v[0] != 0 {
		t.Errorf("revoked devices' resumed sessions admitted on node 2: %v", v)
	}
}
