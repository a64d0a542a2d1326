package sim

// The cluster fleetsim starts, exported for other harnesses (bench's
// cluster scenarios start their fleetgate nodes with it).

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// Cluster is n `fleetgate serve` processes on 127.0.0.1..n, started as
// fleetsim --cluster starts them.
type Cluster struct{ c *clusterProcs }

// StartCluster starts n nodes under workDir, each with the serve flags
// extra besides the cluster's own. With seed, the data directory copied
// to every node is a copy of seed (an initialised data directory whose
// server certificate names 127.0.0.1..n); without it, `fleetgate init`
// makes one. It waits until every node reports ready.
func StartCluster(ctx context.Context, bin, workDir, seed string, n int, extra []string) (*Cluster, error) {
	if seed != "" {
		if err := copyDataDir(filepath.Join(workDir, "gateway"), seed); err != nil {
			return nil, fmt.Errorf("copy %s: %w", seed, err)
		}
	}
	c, err := startCluster(ctx, bin, workDir, n, extra, nil)
	if err != nil {
		return nil, err
	}
	if err := c.waitReady(ctx, 90*time.Second); err != nil {
		c.Close()
		return nil, fmt.Errorf("cluster: %w (logs under %s)", err, workDir)
	}
	return &Cluster{c: c}, nil
}

// Len is the number of nodes.
func (c *Cluster) Len() int { return len(c.c.nodes) }

// Addrs are node i's listeners (kept across restarts).
func (c *Cluster) Addrs(i int) fleetproc.Addrs {
	nd := c.c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	return nd.addrs
}

// PID is node i's current process ID (0: not running).
func (c *Cluster) PID(i int) int { return c.c.nodes[i].pid() }

// DataDir is node i's data directory; Log its log file.
func (c *Cluster) DataDir(i int) string { return c.c.nodes[i].dataDir }

// Log is node i's log file.
func (c *Cluster) Log(i int) string { return c.c.nodes[i].logFile }

// Kill sends SIGKILL to node i and reaps it.
func (c *Cluster) Kill(i int) error { return c.c.nodes[i].kill() }

// Restart starts node i again (same data directory and addresses) and
// waits until it is ready.
func (c *Cluster) Restart(ctx context.Context, i int) error {
	nd := c.c.nodes[i]
	if nd.running() != nil {
		return fmt.Errorf("%s is running", nd.name)
	}
	if err := c.c.start(ctx, nd); err != nil {
		return err
	}
	return c.c.waitReady(ctx, 90*time.Second, nd)
}

// Close stops every node (SIGTERM, SIGKILL after 10 s).
func (c *Cluster) Close() { c.c.Close() }

// seeded reports whether dir already holds an initialised data directory.
func seeded(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, "ca", "root.crt"))
	return err == nil
}

// CopyDataDir copies a data directory, each file keeping its mode (keys
// stay private).
func CopyDataDir(dst, src string) error { return copyDataDir(dst, src) }
