// Package doctest runs the marked blocks of a Markdown document as written,
// so that a document that drifts from the code fails `make test`.
//
// A fenced block is marked by an HTML comment on the line before it
// (invisible when the document is rendered):
//
//	<!-- doctest -->               run this shell block
//	<!-- doctest: write FILE -->   write this block to FILE (relative to the
//	                               directory the script is in at that point)
//
// The marked blocks of a document become one bash script (set -euo
// pipefail, in document order, so variables and `cd` carry over). Run copies
// the repository's files into a temporary directory (a fresh clone: tracked
// and untracked files that git does not ignore, no build output, no data
// directory) and runs the script there inside a network namespace of its
// own (its own loopback, so the documented ports are free and nothing
// outside is reached), with a time bound. What the script starts in the
// background is stopped by PID when it ends (its EXIT trap), and anything
// left in the process group Run started is killed by that group's ID.
package doctest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Block is a marked fenced block.
type Block struct {
	File string // document, as given to Extract
	Line int    // line of the opening fence, 1-based
	Lang string // the fence's info string (sh, go, ...)
	// Write is the file the block is written to; empty: the block is run.
	Write string
	Body  string
}

// Where is file:line of the block.
func (b Block) Where() string { return fmt.Sprintf("%s:%d", b.File, b.Line) }

var marker = regexp.MustCompile(`^<!--\s*doctest(?::\s*(\S+)\s+(\S+))?\s*-->\s*$`)

// Extract returns the marked blocks of the Markdown document src (named
// name in errors and Block.File).
func Extract(name string, src []byte) ([]Block, error) {
	var out []Block
	var pending *Block
	var in *Block
	fence := ""
	sc := bufio.NewScanner(bytes.NewReader(src))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		switch {
		case in != nil:
			if strings.HasPrefix(trimmed, fence) && strings.Trim(trimmed, "`~") == "" {
				out = append(out, *in)
				in = nil
				continue
			}
			in.Body += line + "\n"
		case pending != nil:
			if !strings.HasPrefix(trimmed, "```") && !strings.HasPrefix(trimmed, "~~~") {
				return nil, fmt.Errorf("%s:%d: a doctest marker must be followed by a fenced block", name, pending.Line-1)
			}
			fence = trimmed[:3]
			pending.Lang = strings.TrimSpace(strings.Trim(trimmed, "`~"))
			pending.Line = n
			if pending.Write == "" && pending.Lang != "sh" && pending.Lang != "bash" && pending.Lang != "shell" {
				return nil, fmt.Errorf("%s:%d: a doctest block to run must be sh, not %q", name, n, pending.Lang)
			}
			in, pending = pending, nil
		case strings.HasPrefix(trimmed, "<!--") && strings.Contains(trimmed, "doctest"):
			m := marker.FindStringSubmatch(trimmed)
			if m == nil || (m[1] != "" && m[1] != "write") {
				return nil, fmt.Errorf("%s:%d: unknown doctest marker %q", name, n, trimmed)
			}
			pending = &Block{File: name, Line: n + 1, Write: m[2]}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if in != nil {
		return nil, fmt.Errorf("%s:%d: block not closed", name, in.Line)
	}
	if pending != nil {
		return nil, fmt.Errorf("%s:%d: a doctest marker must be followed by a fenced block", name, pending.Line-1)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no doctest blocks", name)
	}
	return out, nil
}

// Script is the bash script of blocks. It records the time at the end of
// each block (label "file:line") in the file $DOCTEST_MARKS.
func Script(blocks []Block) string {
	var b strings.Builder
	b.WriteString(`set -euo pipefail
# stop what the documented commands started in the background, by PID
trap '__rc=$?; for __p in $(jobs -p); do kill "$__p" 2>/dev/null || true; done; wait || true; exit $__rc' EXIT
__doctest_mark() { echo "$1 $(date +%s.%N)" >> "$DOCTEST_MARKS"; }
__doctest_mark start
`)
	for i, bl := range blocks {
		fmt.Fprintf(&b, "echo '### %s' >&2\n", bl.Where())
		if bl.Write != "" {
			eof := fmt.Sprintf("DOCTEST_EOF_%d", i)
			fmt.Fprintf(&b, "cat > %s <<'%s'\n%s%s\n", shellQuote(bl.Write), eof, bl.Body, eof)
		} else {
			b.WriteString(bl.Body)
		}
		fmt.Fprintf(&b, "__doctest_mark %s\n", shellQuote(bl.Where()))
	}
	return b.String()
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Options of Run.
type Options struct {
	// Repo is the repository root whose files are copied.
	Repo string
	// Doc is the document, relative to Repo.
	Doc string
	// Timeout bounds the whole run (default 10 minutes).
	Timeout time.Duration
	// Env is added to the environment (after FLEETGATE_* variables of the
	// caller are removed, and GOPROXY=off, GOFLAGS=-buildvcs=false set).
	Env []string
}

// Mark is the end of a block, as time since the script started.
type Mark struct {
	Block string
	At    time.Duration
}

// Result of Run.
type Result struct {
	Dir    string // the copy the script ran in
	Output string // stdout and stderr of the script
	Blocks []Block
	Marks  []Mark // Marks[i] is the end of Blocks[i]
}

// DoneAfter is when the first block whose body contains s ended (0: none).
func (r *Result) DoneAfter(s string) time.Duration {
	for i, b := range r.Blocks {
		if strings.Contains(b.Body, s) && i < len(r.Marks) {
			return r.Marks[i].At
		}
	}
	return 0
}

// ErrNoNamespace means a network namespace could not be made here.
var ErrNoNamespace = errors.New("doctest: cannot create a network namespace (unshare --net)")

// Run copies the repository into a temporary directory under tmp and runs
// the marked blocks of o.Doc there, in a network namespace. The error
// names the last block that started.
func Run(ctx context.Context, tmp string, o Options) (*Result, error) {
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Minute
	}
	src, err := os.ReadFile(filepath.Join(o.Repo, o.Doc))
	if err != nil {
		return nil, err
	}
	blocks, err := Extract(o.Doc, src)
	if err != nil {
		return nil, err
	}
	ns, err := netnsCommand()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(tmp, "fleetgate")
	if err := CopyRepo(o.Repo, dir); err != nil {
		return nil, err
	}
	script := filepath.Join(tmp, "doctest.sh")
	marks := filepath.Join(tmp, "marks")
	if err := os.WriteFile(script, []byte(Script(blocks)), 0o644); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	args := append(ns, "--", "bash", "-c", "ip link set lo up && exec bash "+shellQuote(script))
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Dir = dir
	cmd.Env = environ(o.Env, "DOCTEST_MARKS="+marks)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// on timeout: the whole process group this Run started, by its ID
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Start()
	if err == nil {
		pgid := cmd.Process.Pid
		err = cmd.Wait()
		_ = syscall.Kill(-pgid, syscall.SIGKILL) // leftovers of our group, if any
	}
	res := &Result{Dir: dir, Output: out.String(), Blocks: blocks, Marks: readMarks(marks)}
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("timed out after %s: %w", o.Timeout, err)
		}
		return res, fmt.Errorf("%s: %w\n%s", lastBlock(res.Output), err, tail(res.Output, 6000))
	}
	return res, nil
}

// netnsCommand is the unshare command that runs a command in a new network
// namespace, checked to work here.
func netnsCommand() ([]string, error) {
	ns := []string{"unshare", "--net"}
	if os.Geteuid() != 0 {
		ns = []string{"unshare", "--map-root-user", "--net"}
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoNamespace, err)
	}
	if out, err := exec.Command(ns[0], append(ns[1:], "--", "ip", "link", "set", "lo", "up")...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("%w: %v: %s", ErrNoNamespace, err, out)
	}
	return ns, nil
}

func environ(extra []string, more ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "FLEETGATE_") || strings.HasPrefix(kv, "GOPROXY=") || strings.HasPrefix(kv, "GOFLAGS=") {
			continue
		}
		env = append(env, kv)
	}
	// no network in the namespace: modules come from the module cache
	env = append(env, "GOPROXY=off", "GOFLAGS=-buildvcs=false")
	return append(append(env, extra...), more...)
}

func readMarks(path string) []Mark {
	b, _ := os.ReadFile(path)
	var out []Mark
	var start float64
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		label, ts, ok := strings.Cut(l, " ")
		if !ok {
			continue
		}
		t, err := strconv.ParseFloat(ts, 64)
		if err != nil {
			continue
		}
		if label == "start" {
			start = t
			continue
		}
		out = append(out, Mark{Block: label, At: time.Duration((t - start) * float64(time.Second))})
	}
	return out
}

func lastBlock(out string) string {
	i := strings.LastIndex(out, "### ")
	if i < 0 {
		return "before the first block"
	}
	l, _, _ := strings.Cut(out[i+4:], "\n")
	return "block " + l
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// CopyRepo copies the files of the repository at repo that git tracks or
// would track (not ignored) into dst: a clone with the working tree's
// changes, without build output or data directories.
func CopyRepo(repo, dst string) error {
	out, err := exec.Command("git", "-C", repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output()
	if err != nil {
		return fmt.Errorf("doctest: git ls-files: %w", err)
	}
	for _, rel := range strings.Split(string(out), "\x00") {
		if rel == "" {
			continue
		}
		from := filepath.Join(repo, rel)
		fi, err := os.Lstat(from)
		if err != nil || !fi.Mode().IsRegular() {
			continue // deleted in the working tree, or not a file
		}
		if err := copyFile(from, filepath.Join(dst, rel), fi.Mode().Perm()); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(from, to string, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
