package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/server"
)

// init creates the NATS cluster CA; on a data directory initialised
// before it existed, init adds it and changes nothing else; a second run
// changes nothing.
func TestInitClusterCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	if out, err := runLocal(t, "init", "--data-dir", dir); err != nil {
		t.Fatal(err, out)
	}
	caDir := filepath.Join(dir, server.ClusterCADir)
	first, err := natsnode.LoadCA(caDir)
	if err != nil {
		t.Fatal(err)
	}
	out, err := runLocal(t, "init", "--data-dir", dir)
	if err != nil || !strings.Contains(out, "nothing was changed") {
		t.Fatalf("second init: %v\n%s", err, out)
	}
	if again, err := natsnode.LoadCA(caDir); err != nil || !again.Cert.Equal(first.Cert) {
		t.Fatalf("second init replaced the cluster CA: %v", err)
	}
	// A data directory from before the cluster CA.
	if err := os.RemoveAll(caDir); err != nil {
		t.Fatal(err)
	}
	out, err = runLocal(t, "init", "--data-dir", dir)
	if err != nil || !strings.Contains(out, "added the NATS cluster CA") {
		t.Fatalf("init on an older data directory: %v\n%s", err, out)
	}
	if _, err := natsnode.LoadCA(caDir); err != nil {
		t.Fatal(err)
	}
}
