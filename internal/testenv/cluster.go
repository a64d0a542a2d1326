package testenv

import (
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/cluster/natstest"
	"github.com/fleetgate/fleetgate/server"
)

// Cluster is n in-process fleetgate nodes, each with an embedded NATS
// JetStream node, sharing one PKI (the data directory of one `init`,
// copied before the first start), their NATS routes through relays the
// test cuts (Mesh). Node i's NATS listens on 127.0.0.(i+1); its broker
// and APIs on 127.0.0.1.
type Cluster struct {
	Nodes []*Gateway
	Mesh  *natstest.Mesh
}

// StartCluster starts n (≥ 3) nodes and waits until every one is ready
// (its directory proven fresh). tune, if not nil, adjusts each node's
// configuration.
func StartCluster(t testing.TB, n int, tune func(i int, cfg *server.Config)) *Cluster {
	t.Helper()
	src := Init(t)
	c := &Cluster{Nodes: make([]*Gateway, n), Mesh: natstest.NewMesh(t, n)}
	listen := make([]string, n)
	for i := range n {
		listen[i] = natstest.FreeAddr(t, natstest.Host(i))
		c.Mesh.SetTarget(i, listen[i])
	}
	for i := range n {
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("node%d", i))
		if err := CopyDataDir(dir, src); err != nil {
			t.Fatal(err)
		}
		cfg := Config(t, Options{DataDir: dir})
		cfg.Cluster = server.ClusterConfig{ClusterName: "e2e", NodeName: fmt.Sprintf("node%d", i), NATSListen: listen[i],
			NATSAdvertise: natstest.Advertise(i), NATSRoutes: c.Mesh.Routes(i), StaleAfter: time.Second}
		if tune != nil {
			tune(i, &cfg)
		}
		c.Nodes[i] = StartConfig(t, cfg)
	}
	for i, g := range c.Nodes {
		Eventually(t, 60*time.Second, func() error {
			if code := g.Ready(); code != http.StatusOK {
				return fmt.Errorf("node %d: /readyz %d", i, code)
			}
			return nil
		})
	}
	return c
}

// Ready is the status code of the node's /readyz (0 if unreachable).
func (g *Gateway) Ready() int {
	cl := &http.Client{Timeout: 2 * time.Second}
	resp, err := cl.Get("http://" + g.Addrs.Metrics + "/readyz")
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// CopyDataDir copies a data directory, keys kept private (0600).
func CopyDataDir(dst, src string) error {
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		return err
	}
	return filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if fi, err := os.Stat(filepath.Join(src, strings.TrimPrefix(p, dst))); err == nil {
			return os.Chmod(p, fi.Mode().Perm())
		}
		return nil
	})
}
