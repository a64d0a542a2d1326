package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"
)

// Scenario 6: revoke → closed.

// Revoke connects the given devices (in addition to whatever is connected),
// revokes them one by one through the admin API and measures the time from
// the revoke call starting to the device's connection being closed, then
// tries a resumed TLS session of each revoked device: it must be refused.
// In a cluster the devices are on node 2 and the revoke goes through node
// 1's API.
func (e *Env) Revoke(ctx context.Context, b *Broker, devices []Identity) (Values, error) {
	admin, err := e.Admin(b.node(0))
	if err != nil {
		return nil, err
	}
	dialer := &Dialer{Addr: b.node(1).MQTT, ServerName: "localhost"}
	type target struct {
		id     Identity
		cfg    *tls.Config
		conn   *Conn
		closed chan time.Time
	}
	ts := make([]*target, len(devices))
	retried := 0
	// connect, as a device does, tries again (5 times, 200 ms apart) when
	// the CONNACK refuses it or the broker closes instead: a cluster node
	// may while it takes the session record over.
	connect := func(t *target) (*Conn, error) {
		for try := 0; ; try++ {
			c, err := dialer.Connect(ctx, t.cfg, t.id.Name, 900, 256)
			if err == nil || try == 5 || !(errors.Is(err, ErrRefused) || errors.Is(err, io.EOF)) {
				return c, err
			}
			retried++
			time.Sleep(200 * time.Millisecond)
		}
	}
	for i, id := range devices {
		t := &target{id: id, cfg: e.ClientTLS(id, tls.NewLRUClientSessionCache(1)), closed: make(chan time.Time, 1)}
		// first connection fills the session cache; the second must resume
		c, err := connect(t)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", id.Name, err)
		}
		c.Disconnect()
		if t.conn, err = connect(t); err != nil {
			return nil, fmt.Errorf("%s: %w", id.Name, err)
		}
		go func() {
			var buf [256]byte
			for {
				if _, err := t.conn.R.Read(buf[:]); err != nil {
					t.closed <- time.Now()
					return
				}
			}
		}()
		ts[i] = t
	}
	defer func() {
		for _, t := range ts {
			if t != nil && t.conn != nil {
				t.conn.TLS.Close()
			}
		}
	}()
	var fromStart, fromReturn []time.Duration
	var resumedBefore, refused, admitted int
	for _, t := range ts {
		if t.conn.Resumed {
			resumedBefore++
		}
		t0 := time.Now()
		if _, err := admin.DeviceAction(ctx, t.id.Name, "revoke", "fleetbench"); err != nil {
			return nil, fmt.Errorf("revoke %s: %w", t.id.Name, err)
		}
		t1 := time.Now()
		select {
		case tc := <-t.closed:
			fromStart = append(fromStart, tc.Sub(t0))
			fromReturn = append(fromReturn, max(0, tc.Sub(t1)))
		case <-time.After(5 * time.Second):
			return nil, fmt.Errorf("%s: session still open 5 s after revoke", t.id.Name)
		}
		// the revoked device presents its cached TLS session again
		c, err := dialer.Connect(ctx, t.cfg, t.id.Name, 900, 256)
		if err != nil {
			refused++
		} else {
			admitted++
			c.TLS.Close()
		}
	}
	slices.Sort(fromStart)
	slices.Sort(fromReturn)
	return Values{
		"revoke→closed p50 ms":         ms(pct(fromStart, 0.5)),
		"revoke→closed p99 ms":         ms(pct(fromStart, 0.99)),
		"after call returned p99 ms":   ms(pct(fromReturn, 0.99)),
		"revoked, resumption refused":  float64(refused),
		"revoked, resumption admitted": float64(admitted),
		"resumed before revoke (of n)": float64(resumedBefore),
		"CONNECT refused, tried again": float64(retried),
	}, nil
}
