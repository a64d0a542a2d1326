package bench

// In-process versions of the fan-in and idle scenarios, for profiles:
// fleetgate exposes no pprof endpoint, so these run the gateway in the test
// binary (default policy, limits raised as `make bench` does, logging at
// warn) and drive it with the same load generator:
//
//	go test -run '^$' -bench FanInQoS0 -benchtime 1x -cpuprofile cpu.out ./bench/
//	go tool pprof -top -focus 'mochi|fleetgate/broker' bench.test cpu.out
//	FLEETBENCH_HEAPPROFILE=heap.out go test -run '^$' -bench Idle -benchtime 1x ./bench/
//
// The profile holds the generator's goroutines too (package bench,
// crypto/tls on the client side); focus on the broker's packages. Nothing
// here asserts a time.

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/enroll/ca"
	"github.com/fleetgate/fleetgate/internal/fleetproc"
	"github.com/fleetgate/fleetgate/server"
)

func inProcess(b *testing.B, devices int) (*Env, *Broker) {
	if testing.Short() {
		b.Skip("enrolls devices and runs a gateway")
	}
	work := b.TempDir()
	e := &Env{Work: work, Logf: b.Logf}
	if _, err := server.Init(e.DataDir(), ca.InitOptions{TrustDomain: "fleetgate.local", Hosts: []string{"localhost", "127.0.0.1"}}); err != nil {
		b.Fatal(err)
	}
	if err := e.loadRoots(); err != nil {
		b.Fatal(err)
	}
	addrFile := filepath.Join(work, "addrs.json")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		cfg := server.Defaults()
		cfg.DataDir, cfg.MQTTAddr, cfg.APIAddr, cfg.MetricsAddr, cfg.AddrFile = e.DataDir(), "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", addrFile
		cfg.MaxPending, cfg.MaxPendingPerIP = 4096, 4096
		cfg.MsgRate, cfg.MsgBurst, cfg.ByteRate, cfg.ByteBurst = 1e9, 1e9, 1e12, 1<<40
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelWarn}))
		if s, err := server.New(cfg); err == nil {
			_ = s.Run(ctx)
		}
	}()
	b.Cleanup(func() {
		cancel()
		<-done
	})
	fg := &Broker{Name: "fleetgate", PID: os.Getpid()}
	a, err := fleetproc.WaitAddrs(ctx, addrFile, 30*time.Second, done)
	if err == nil {
		err = fg.setAddrs(a)
	}
	if err != nil {
		b.Fatalf("gateway did not start: %v", err)
	}
	if err := e.Enroll(ctx, fg, devices); err != nil {
		b.Fatal(err)
	}
	return e, fg
}

func report(b *testing.B, v Values) {
	for k, x := range v {
		b.ReportMetric(x, strings.ReplaceAll(k, " ", "_"))
	}
}

func BenchmarkFanInQoS0(b *testing.B) { benchFanIn(b, 0, 0) }

func BenchmarkFanInQoS1(b *testing.B) { benchFanIn(b, 1, 16) }

// benchFanIn runs scenario 3 (QoS 0) or 4 (QoS 1) with 200 publishers.
func benchFanIn(b *testing.B, qos byte, window int) {
	e, fg := inProcess(b, 200)
	b.ResetTimer()
	v, err := e.FanIn(context.Background(), fg, 200, qos, 5*time.Second, window, 0)
	if err != nil {
		b.Fatal(err)
	}
	report(b, v)
}

// BenchmarkIdle holds FLEETBENCH_IDLE (default 2,000) idle connections and,
// with FLEETBENCH_HEAPPROFILE set, writes a heap profile while they are
// connected. RSS here includes the generator's side of the connections.
func BenchmarkIdle(b *testing.B) {
	n := 2000
	if v, err := strconv.Atoi(os.Getenv("FLEETBENCH_IDLE")); err == nil && v > 0 {
		n = v
	}
	e, fg := inProcess(b, n)
	b.ResetTimer()
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	v, err := e.Idle(context.Background(), fg, n, 64, func() (Values, error) {
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		perConn := func(a, b uint64) float64 { return (float64(a) - float64(b)) / float64(n) / 1024 }
		b.ReportMetric(perConn(after.HeapInuse, before.HeapInuse), "heap_inuse_KB/conn")
		b.ReportMetric(perConn(after.StackInuse, before.StackInuse), "stack_KB/conn")
		b.ReportMetric(perConn(after.Sys-after.HeapReleased, before.Sys-before.HeapReleased), "sys_KB/conn")
		// Two collections: the runtime shrinks an idle goroutine's stack
		// during a collection, by half each time.
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(perConn(after.HeapAlloc, before.HeapAlloc), "live_heap_KB/conn")
		b.ReportMetric(perConn(after.StackInuse, before.StackInuse), "stack_after_gc_KB/conn")
		if p := os.Getenv("FLEETBENCH_HEAPPROFILE"); p != "" {
			runtime.GC()
			f, err := os.Create(p)
			if err != nil {
				return nil, err
			}
			defer f.Close()
			return nil, pprof.WriteHeapProfile(f)
		}
		return nil, nil
	})
	if err != nil {
		b.Fatal(err)
	}
	report(b, v)
}

// BenchmarkConnects runs scenarios 1 and 2 in-process (for a CPU profile of
// the connect path; the profile holds the generator's TLS client side too:
// focus on crypto/tls.(*Conn).serverHandshake and the broker packages).
func BenchmarkConnects(b *testing.B) {
	e, fg := inProcess(b, 96)
	for _, resume := range []bool{false, true} {
		name := "full"
		if resume {
			name = "resumed"
		}
		b.Run(name, func(b *testing.B) {
			v, err := e.Connects(context.Background(), fg, 96, 5*time.Second, resume)
			if err != nil {
				b.Fatal(err)
			}
			report(b, v)
		})
	}
}
