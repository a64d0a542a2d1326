package natsnode_test

import (
	"context"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
	"github.com/fleetgate/fleetgate/cluster/natstest"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// What syncing before acknowledging costs: replicated R3 KV puts, one at
// a time (the path of a QoS 1 message's store), on three in-process nodes
// with JetStream's SyncAlways and with its default (sync every 2 min), and
// (what TLS routes cost) with SyncAlways over plain routes.
// Reports latency percentiles and the CPU of all three nodes per put.
//
//	go test -run '^$' -bench ReplicatedKVPut -benchtime 2000x ./cluster/natsnode/
func BenchmarkReplicatedKVPut(b *testing.B) {
	for _, mode := range []struct {
		name          string
		noSync, plain bool
	}{{"sync-always", false, false}, {"default-no-sync", true, false}, {"sync-always-plain-routes", false, true}} {
		b.Run(mode.name, func(b *testing.B) {
			c := natstest.StartWith(b, 3, func(_ int, cfg *natsnode.Config) {
				cfg.NoSync = mode.noSync
				if mode.plain {
					cfg.TLS, cfg.PlainRoutes = nil, true
				}
			})
			js, err := jetstream.New(c.Connect(0))
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			kv, err := natsnode.Bucket(bctx, js, "bench")
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			val := make([]byte, 256)
			lat := make([]time.Duration, 0, b.N)
			cpu0 := cpuTime()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if _, err := kv.Put(ctx, "k", val); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			b.StopTimer()
			cpu := cpuTime() - cpu0
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/put")
		})
	}
}
