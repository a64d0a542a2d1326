package broker_test

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	paho5 "github.com/eclipse/paho.golang/paho"

	"github.com/fleetgate/fleetgate/internal/testenv"
)

// TestKeepaliveIsBounded: a client asking for keepalive 0 ("never time me
// out") or for more than --max-keepalive is granted the bound. MQTT 5
// clients are told in the CONNACK (Server Keep Alive); an MQTT 3.1.1
// client that then sends nothing is disconnected after 1.5 × the bound
// (before, it was held open for as long as its TCP connection lived).
func TestKeepaliveIsBounded(t *testing.T) {
	cfg := testenv.Config(t, testenv.Options{})
	cfg.MaxKeepalive = 2
	g := testenv.StartConfig(t, cfg)
	cert := certOf(t, g.EnrollDevice(t, "ka-dev", "lab"))

	for _, c := range []struct {
		ask  uint16
		want *uint16 // nil: the client's own keepalive stands
	}{{0, ptr(uint16(2))}, {3600, ptr(uint16(2))}, {1, nil}} {
		conn := dialTLS(t, g, cert, nil)
		cl := paho5.NewClient(paho5.ClientConfig{Conn: conn, OnClientError: func(error) {}})
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ack, err := cl.Connect(ctx, &paho5.Connect{ClientID: "ka-dev", CleanStart: true, KeepAlive: c.ask})
		cancel()
		if err != nil || ack == nil || ack.ReasonCode != 0 {
			t.Fatalf("keepalive %d: CONNACK %+v, %v", c.ask, ack, err)
		}
		var got *uint16
		if ack.Properties != nil {
			got = ack.Properties.ServerKeepAlive
		}
		switch {
		case c.want == nil && got != nil:
			t.Errorf("keepalive %d: Server Keep Alive %d in the CONNACK, want none", c.ask, *got)
		case c.want != nil && (got == nil || *got != *c.want):
			t.Errorf("keepalive %d: Server Keep Alive %v in the CONNACK, want %d", c.ask, got, *c.want)
		}
		_ = cl.Disconnect(&paho5.Disconnect{})
	}

	// MQTT 3.1.1, keepalive 0, then silence.
	conn := dialTLS(t, g, cert, nil)
	id := "ka-dev"
	connect := []byte{0x10, byte(12 + len(id)), 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 0, 0, byte(len(id))}
	if _, err := conn.Write(append(connect, id...)); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	ack := make([]byte, 4)
	if _, err := io.ReadFull(conn, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("3.1.1 CONNACK % x, %v", ack, err)
	}
	_, err := conn.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("an MQTT 3.1.1 client with keepalive 0 that sent nothing was still connected after 60 s (bound: 3 s)")
	}
	if err == nil {
		t.Fatal("unexpected packet from the broker")
	}
}
