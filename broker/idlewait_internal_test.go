package broker

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/fleetgate/fleetgate/internal/testpki"
)

// tlsPair is a TLS 1.3 connection over loopback TCP: the server side as the
// listener makes it (conn over admittedConn), the client side plain.
func tlsPair(t *testing.T) (*conn, *tls.Conn) {
	t.Helper()
	ca := testpki.NewCA(t, "idle CA")
	srvCert := testpki.Issue(t, ca, testpki.Leaf{CN: "localhost", EKU: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	rawClient, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	rawServer := <-accepted
	if rawServer == nil {
		t.Fatal("accept failed")
	}
	ac := &admittedConn{Conn: rawServer}
	srv := &conn{Conn: tls.Server(ac, &tls.Config{Certificates: []tls.Certificate{srvCert}, MinVersion: tls.VersionTLS13}), raw: ac}
	// testpki's leaf has no DNS name: the client checks the chain itself.
	cli := tls.Client(rawClient, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			return err
		}})
	t.Cleanup(func() { srv.Close(); cli.Close() })
	for _, c := range []net.Conn{srv, cli} {
		if err := c.SetDeadline(time.Now().Add(60 * time.Second)); err != nil { // fail, not hang
			t.Fatal(err)
		}
	}
	errs := make(chan error, 1)
	go func() { errs <- cli.Handshake() }()
	if err := srv.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	return srv, cli
}

func mustBuffered(t *testing.T, c *conn, want bool) {
	t.Helper()
	got, err := c.Buffered()
	if err != nil || got != want {
		t.Fatalf("Buffered() = %v, %v; want %v, nil", got, err, want)
	}
}

// What crypto/tls holds is reported as buffered and read in order; with
// nothing held, WaitReadable waits for the socket and the byte it took is
// the first the next TLS read gets; the probe leaves no error behind.
func TestIdleWaitOverTLS(t *testing.T) {
	srv, cli := tlsPair(t)
	mustBuffered(t, srv, false)
	mustBuffered(t, srv, false) // the probe's error is not the connection's

	// Two records in one write: a read of the first byte leaves the rest
	// of the first record decrypted, and the second one raw, in crypto/tls.
	go func() { _, _ = cli.Write([]byte("hello")); _, _ = cli.Write([]byte(" world")) }()
	if err := srv.WaitReadable(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 0, 11)
	one := make([]byte, 1)
	for len(got) < 11 {
		if len(got) > 0 && len(got) < 5 {
			mustBuffered(t, srv, true)
		}
		n, err := srv.Read(one)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, one[:n]...)
		if len(got) == 5 {
			// The second record may still be on its way: wait for it
			// as the read loop would, unless it is held already.
			if ok, err := srv.Buffered(); err != nil {
				t.Fatal(err)
			} else if !ok {
				if err := srv.WaitReadable(); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if string(got) != "hello world" {
		t.Fatalf("read %q", got)
	}
	mustBuffered(t, srv, false)

	// The read deadline ends a wait with a timeout, and the connection
	// still works afterwards.
	if err := srv.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if err := srv.WaitReadable(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("WaitReadable past the deadline: %v", err)
	}
	if err := srv.SetReadDeadline(time.Now().Add(60 * time.Second)); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = cli.Write([]byte("again")) }()
	if err := srv.WaitReadable(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(srv, buf, 5)
	if err != nil || string(buf[:n]) != "again" {
		t.Fatalf("after a timed-out wait: %q, %v", buf[:n], err)
	}

	// The client's close_notify, which crypto/tls may already hold: as the
	// read loop does, Buffered then (if nothing is held) WaitReadable, then
	// EOF.
	if err := cli.Close(); err != nil {
		t.Fatal(err)
	}
	ok, err := srv.Buffered()
	if err == nil && !ok {
		err = srv.WaitReadable()
	}
	if err != nil && err != io.EOF {
		t.Fatalf("waiting for close_notify: %v", err)
	}
	if _, err := srv.Read(buf); err != io.EOF {
		t.Fatalf("Read after close_notify: %v", err)
	}
}
