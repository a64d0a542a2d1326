// Package atomicfile writes a file so that a reader (or a crash) sees the
// old content or the new, never a part: a temporary file in the same
// folder, synced, renamed over the target. It imports nothing of
// fleetgate, so the device SDK (linked into firmware) and the server both
// use it.
package atomicfile

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Write replaces path with data at mode. The temporary file has a unique
// name (concurrent writers of one path do not collide) and is removed on
// failure; the folder is synced after the rename, where the system allows.
func Write(path string, data []byte, mode fs.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // after a successful rename: nothing to remove
	err = tmp.Chmod(mode)
	if err == nil {
		_, err = tmp.Write(data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // the rename itself durable; not every file system can
		d.Close()
	}
	return nil
}
