package cluster

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// A node that lost its quorum stops within its shutdown deadline
// (cluster_shutdown_timeout, brokercluster.go): nodes 1 and 2 are
// SIGKILLed, then node 3 gets SIGTERM with persistent sessions with wills
// connected. Closing them writes their session records and claims their
// wills in JetStream, which cannot acknowledge without a majority; the
// stop gives up on those writes at the deadline, says so in its log, and
// the process exits with status 0. The bound asserted is three times the
// deadline (the machine is loaded; without the deadline each write waited
// out its own 5 s acknowledgement timeout).
func TestClusterNodeWithoutQuorumStopsWithinItsDeadline(t *testing.T) {
	const deadline = 3 * time.Second
	// The second staleness bound is set far out so that node 3 still holds
	// the sessions when it is stopped (otherwise it closes them itself
	// 5 s after losing the quorum).
	c := startProcCluster(t, 3, "--cluster-shutdown-timeout", deadline.String(), "--cluster-stale-close-after", "10m")
	const n = 5
	for i := range n {
		id := fmt.Sprint("stop-", i)
		cert := deviceCert(t, c.gws[0].EnrollDevice(t, id, "fleet"))
		testenv.Eventually(t, 20*time.Second, func() error {
			_, err := c.gws[2].MQTT(t, id, cert, func(o *paho.ClientOptions) {
				o.SetCleanSession(false).SetWill("devices/"+id+"/state", "gone", 1, false)
			})
			return err
		})
	}
	kill(t, c.procs[0])
	kill(t, c.procs[1])

	p := c.procs[2]
	t0 := time.Now()
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(3 * deadline):
		kill(t, p)
		t.Fatalf("node 3 (quorum lost) did not exit within 3× its %s shutdown deadline; log:\n%s", deadline, p.Log())
	}
	took := time.Since(t0).Round(time.Millisecond)
	if err := p.Wait(); err != nil {
		t.Errorf("node 3 exited with %v", err)
	}
	log := p.Log()
	t.Logf("node 3 (quorum lost, %d sessions) exited %s after SIGTERM (deadline %s)", n, took, deadline)
	var summary string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "cluster node stopping") {
			summary = l
		}
	}
	if !strings.Contains(summary, "writes not done within the shutdown deadline") {
		t.Fatalf("node 3's log does not say which cluster writes the stop gave up (%q); log:\n%s", summary, log)
	}
	t.Log(summary)
	for i := range n {
		if !strings.Contains(summary, fmt.Sprint("stop-", i)) && !strings.Contains(summary, "not_written="+fmt.Sprint(n)) {
			t.Errorf("stop-%d's session record is not among the writes reported", i)
		}
	}
}
