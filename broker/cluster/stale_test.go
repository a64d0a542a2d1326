package cluster_test

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testenv"
	"github.com/fleetgate/fleetgate/server"
)

// The second staleness bound (issue 13, "past a second bound it closes its
// sessions"): node 3 is cut off from the other two. Past the first bound
// it refuses new connections but its live sessions go on; past the second
// it closes them with MQTT 5 reason 0x8B (server shutting down) and says
// why in its log; after the heal its clients can connect to it again.
func TestStaleNodeClosesItsSessionsPastTheSecondBound(t *testing.T) {
	c := testenv.StartCluster(t, 3, func(_ int, cfg *server.Config) {
		cfg.Cluster.StaleCloseAfter = 3 * time.Second
	})
	n1, n3 := c.Nodes[0], c.Nodes[2]
	dev := n1.EnrollDevice(t, "dev-s", "lab")
	cert := deviceCert(t, dev)
	cl := dial5(t, n3, "dev-s", cert)

	c.Mesh.Cut(2)
	// First bound: node 3 reports not ready (and refuses CONNECTs) while
	// the device's connection is still open.
	testenv.Eventually(t, 10*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusServiceUnavailable {
			return fmt.Errorf("node 3 /readyz %d, want 503", code)
		}
		return nil
	})
	select {
	case d := <-cl.disc:
		t.Fatalf("node 3 closed the session (0x%02X) before its first staleness bound", d.ReasonCode)
	case <-cl.Done():
		t.Fatal("node 3 closed the session before its first staleness bound")
	default:
	}
	// Second bound: the session is closed with 0x8B.
	select {
	case d := <-cl.disc:
		if d.ReasonCode != 0x8B {
			t.Fatalf("node 3 closed the session with 0x%02X, want 0x8B", d.ReasonCode)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("node 3, cut off, did not close its session past the second bound")
	}
	select {
	case <-cl.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the connection is still open after the DISCONNECT")
	}
	// The node logs once it has closed them (the line counts them), so
	// the line may come just after the client saw its DISCONNECT.
	testenv.Eventually(t, 10*time.Second, func() error {
		if !strings.Contains(n3.Logs.String(), "stale past the second bound") {
			return errors.New("node 3 did not log why it closed its sessions")
		}
		return nil
	})

	c.Mesh.Heal(2)
	testenv.Eventually(t, 60*time.Second, func() error {
		if code := n3.Ready(); code != http.StatusOK {
			return fmt.Errorf("node 3 /readyz %d after the heal", code)
		}
		return nil
	})
	// dial5 retries (bounded) while node 3 may fail closed again for a
	// moment after the heal (leader elections).
	dial5(t, n3, "dev-s", cert)
}
