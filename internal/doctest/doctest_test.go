package doctest

import (
	"context"
	"errors"
	"go/format"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runDoc runs doc's marked blocks as written and logs when each block ended.
func runDoc(t *testing.T, doc string, tools ...string) *Result {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binaries and runs the document (not in -short)")
	}
	for _, tool := range append([]string{"git", "make", "bash", "curl", "unshare", "ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			skipOrFail(t, tool+" not installed")
		}
	}
	res, err := Run(context.Background(), t.TempDir(), Options{Repo: repoRoot(t), Doc: doc, Timeout: 12 * time.Minute})
	if errors.Is(err, ErrNoNamespace) {
		skipOrFail(t, err.Error())
	}
	if res != nil {
		for _, m := range res.Marks {
			t.Logf("%-28s done after %6.1f s", m.Block, m.At.Seconds())
		}
	}
	if err != nil {
		gw := ""
		if res != nil {
			if b, _ := os.ReadFile(filepath.Join(res.Dir, "gateway.log")); len(b) > 0 {
				gw = "\ngateway.log:\n" + tail(string(b), 3000)
			}
		}
		t.Fatalf("%s as written fails at %v%s", doc, err, gw)
	}
	return res
}

func skipOrFail(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("FLEETGATE_REQUIRE_TOOLS") != "" {
		t.Fatal(why)
	}
	t.Skip(why)
}

// TestQuickstartAsWritten runs docs/quickstart.md's marked blocks (§2–§5:
// build, init, serve, token, the Go device program built with the replace
// line and run, the backend's mosquitto_sub, server-cert show/renew) in a
// fresh copy of the repository, its own network namespace and a fresh
// data directory.
func TestQuickstartAsWritten(t *testing.T) {
	res := runDoc(t, "docs/quickstart.md", "go", "mosquitto_sub")
	for _, want := range []string{
		"for gateway.example.com, localhost, 10.0.0.5, 127.0.0.1, ::1", // init names every name
		"published as sensor-1",               // the Go device
		`devices/sensor-1/state {"fw":"1.0"}`, // the backend received it
		"names:     gateway.example.com, localhost, mqtt.example.com, 10.0.0.5, 127.0.0.1, ::1", // renew --host
	} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("output lacks %q:\n%s", want, tail(res.Output, 4000))
		}
	}
	t.Logf("fresh copy to a first message from the Go device (make build, init, serve, token, go run): %.1f s, of which %.1f s after the gateway was ready", res.DoneAfter("go run .").Seconds(), (res.DoneAfter("go run .") - res.DoneAfter("readyz")).Seconds())
}

// TestDevicesAsWritten runs docs/devices.md's marked blocks: a device made
// with openssl enrolled with curl (JSON and EST), renewed, publishing with
// mosquitto_pub, and the fleetgate-device agent.
func TestDevicesAsWritten(t *testing.T) {
	res := runDoc(t, "docs/devices.md", "openssl", "jq", "mosquitto_pub", "go")
	t.Logf("fresh copy to a first message from a curl+openssl+mosquitto device (make build, init, serve, token, key, CSR, enroll, publish): %.1f s, of which %.1f s after the gateway was ready", res.DoneAfter("mosquitto_pub").Seconds(), (res.DoneAfter("mosquitto_pub") - res.DoneAfter("readyz")).Seconds())
}

// TestExtract: markers, write blocks, and the mistakes a doc writer makes.
func TestExtract(t *testing.T) {
	doc := "# x\n<!-- doctest -->\n```sh\necho a\n```\n\n```sh\nnot run\n```\n<!-- doctest: write main.go -->\n```go\npackage main\n```\n"
	bs, err := Extract("d.md", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 2 || bs[0].Body != "echo a\n" || bs[0].Line != 3 || bs[1].Write != "main.go" || bs[1].Lang != "go" {
		t.Fatalf("%+v", bs)
	}
	s := Script(bs)
	if !strings.Contains(s, "cat > 'main.go' <<'DOCTEST_EOF_1'\npackage main\nDOCTEST_EOF_1\n") || strings.Contains(s, "not run") {
		t.Fatalf("script:\n%s", s)
	}
	for _, bad := range []string{
		"<!-- doctest -->\ntext\n",
		"<!-- doctest -->\n```go\nx\n```\n",
		"<!-- doctest: run x -->\n```sh\nx\n```\n",
		"<!-- doctest -->\n```sh\nx\n",
		"no blocks\n",
	} {
		if _, err := Extract("d.md", []byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

// TestGoBlocksAreGofmt: the Go programs the docs show are gofmt's output
// (fast; the doc tests above build and run them).
func TestGoBlocksAreGofmt(t *testing.T) {
	for _, doc := range []string{"docs/quickstart.md", "docs/devices.md"} {
		src, err := os.ReadFile(filepath.Join(repoRoot(t), doc))
		if err != nil {
			t.Fatal(err)
		}
		bs, err := Extract(doc, src)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bs {
			if b.Lang != "go" {
				continue
			}
			out, err := format.Source([]byte(b.Body))
			if err != nil || string(out) != b.Body {
				t.Errorf("%s: not gofmt'ed (%v)", b.Where(), err)
			}
		}
	}
}
