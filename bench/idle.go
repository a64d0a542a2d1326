package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// Scenario 5: idle connections (scenario 6, revocation, runs while they
// are connected: revoke.go).

// IdleResult are the live idle connections, closed by Close.
type idleConns []*Conn

func (ic idleConns) Close() {
	for _, c := range ic {
		if c == nil {
			continue
		}
		if tc, ok := c.TLS.NetConn().(*net.TCPConn); ok {
			tc.SetLinger(0) // RST: no TIME_WAIT for thousands of ports
		}
		c.TLS.Close()
	}
}

// Idle connects devices [0, n) and keeps them open without traffic; it
// reports the broker's RSS per connection (RSS after minus RSS before,
// divided by n) and the time to connect all. then, if set, runs while they
// are connected.
func (e *Env) Idle(ctx context.Context, b *Broker, n, workers int, then func() (Values, error)) (Values, error) {
	dialer := &Dialer{Addr: b.MQTT, ServerName: "localhost", Timeout: 60 * time.Second}
	time.Sleep(time.Second)
	before, err := fleetproc.RSS(b.PID)
	if err != nil {
		return nil, err
	}
	goBefore := goMemory(b)
	meter, _ := startCPU(b.PID)
	conns := make(idleConns, n)
	defer conns.Close()
	start := time.Now()
	if err := parallel(ctx, n, workers, func(i int) error {
		c, err := dialer.Connect(ctx, e.ClientTLS(e.Devices[i], nil), e.Devices[i].Name, 900, 16)
		if err != nil {
			return fmt.Errorf("%s: %w", e.Devices[i].Name, err)
		}
		conns[i] = c
		return nil
	}); err != nil {
		return nil, err
	}
	took := time.Since(start)
	cpu, _ := meter.since()
	time.Sleep(3 * time.Second) // let the broker settle (Go: background GC)
	after, err := fleetproc.RSS(b.PID)
	if err != nil {
		return nil, err
	}
	v := Values{
		"connect all s":      took.Seconds(),
		"RSS KB/conn":        float64(after-before) / 1024 / float64(n),
		"RSS MB total":       float64(after) / (1 << 20),
		"broker CPU µs/conn": us(cpu) / float64(n),
		"connections":        float64(n),
	}
	// For a Go broker, where the memory is: heap in use, and goroutine
	// stacks (from its /metrics).
	if goAfter := goMemory(b); goBefore != nil && goAfter != nil {
		for _, k := range []string{"go_memstats_heap_inuse_bytes", "go_memstats_stack_inuse_bytes"} {
			name := map[string]string{"go_memstats_heap_inuse_bytes": "Go heap KB/conn", "go_memstats_stack_inuse_bytes": "Go stacks KB/conn"}[k]
			v[name] = (goAfter[k] - goBefore[k]) / 1024 / float64(n)
		}
	}
	if then != nil {
		w, err := then()
		if err != nil {
			return nil, err
		}
		for k, x := range w {
			v[k] = x
		}
	}
	return v, nil
}

// goMemory reads the Go runtime's memory gauges from a broker's /metrics
// (nil for a broker without one).
func goMemory(b *Broker) map[string]float64 {
	if b.Metrics == "" {
		return nil
	}
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + b.Metrics + "/metrics")
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil
	}
	m := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		name, val, ok := strings.Cut(line, " ")
		if !ok || !strings.HasPrefix(name, "go_memstats_") {
			continue
		}
		if f, err := strconv.ParseFloat(val, 64); err == nil {
			m[name] = f
		}
	}
	return m
}
