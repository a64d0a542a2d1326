package main

import (
	"fmt"
	"io"
	"path/filepath"

	"github.com/fleetgate/fleetgate/server"
)

// initClusterCAOnly is init on a data directory that holds a CA: it adds
// the NATS cluster CA if the directory has none (created before it
// existed), and changes nothing else.
func initClusterCAOnly(out io.Writer, dataDir string) error {
	created, err := server.InitClusterCA(dataDir)
	if err != nil {
		return err
	}
	if created {
		fmt.Fprintf(out, "%s already holds a CA; added the NATS cluster CA %s (copy it to every cluster node before they serve; docs/cluster.md)\n",
			dataDir, filepath.Join(dataDir, server.ClusterCADir))
		return nil
	}
	fmt.Fprintf(out, "%s already holds a CA; nothing was changed (fleetgate init never overwrites a CA).\n", dataDir)
	return nil
}
