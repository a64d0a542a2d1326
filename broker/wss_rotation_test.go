package broker_test

import (
	"context"
	"testing"
	"time"
)

// TestWSSFollowsRotation: MQTT over WebSocket follows an issuing-CA
// rotation as the mTLS listener does: a certificate of the new CA is
// admitted (the listener names it in its certificate request), and a
// forced retirement closes a wss session on the old CA.
func TestWSSFollowsRotation(t *testing.T) {
	g := startWSS(t)
	ctx := context.Background()
	oldID := g.CA.Current().ID
	oldCert := certOf(t, g.EnrollDevice(t, "ws-old", "lab"))
	lost := make(chan error, 1)
	if _, err := wssClient(t, g, "ws-old", &oldCert, lost); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Admin.CARotate(ctx); err != nil {
		t.Fatal(err)
	}
	newCert := certOf(t, g.EnrollDevice(t, "ws-new", "lab"))
	if _, err := wssClient(t, g, "ws-new", &newCert, nil); err != nil {
		t.Fatalf("wss with a certificate of the new issuing CA: %v", err)
	}
	r, err := g.Admin.CARetire(ctx, oldID, true)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatalf("wss session on the retired CA not closed (%d closed)", r.SessionsClosed)
	}
	if _, err := wssClient(t, g, "ws-old", &oldCert, nil); err == nil {
		t.Fatal("wss admitted a retired CA's certificate")
	}
}
