package atomicfile_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/fleetgate/fleetgate/internal/atomicfile"
)

// TestWrite: the file gets the data and mode, an old file is replaced,
// no temporary file is left, and a failed write leaves the old content.
func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "key.pem")
	if err := atomicfile.Write(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.Write(p, []byte("two"), 0o644); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil || string(b) != "two" {
		t.Fatalf("content %q %v", b, err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v", fi.Mode().Perm())
	}
	if err := atomicfile.Write(filepath.Join(dir, "missing", "x"), []byte("x"), 0o600); err == nil {
		t.Fatal("a write into a missing folder succeeded")
	}
	// The target is a folder: the rename fails, the temporary file goes.
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sub", "f"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := atomicfile.Write(filepath.Join(dir, "sub"), []byte("x"), 0o600); err == nil {
		t.Fatal("replaced a non-empty folder")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 2 {
		t.Fatalf("left behind: %v", ents)
	}
	if b, _ := os.ReadFile(p); string(b) != "two" {
		t.Fatalf("a failed write changed the file: %q", b)
	}
}
