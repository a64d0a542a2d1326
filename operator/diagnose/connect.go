package diagnose

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// Attempt is the outcome of a live connection attempt.
type Attempt struct {
	// Accepted: CONNACK 0 (connection accepted).
	Accepted bool `json:"accepted"`
	// Stage where it ended: "tcp", "tls", "connect" (MQTT CONNECT/CONNACK).
	Stage  string `json:"stage"`
	Detail string `json:"detail"`
}

// Connect makes a live attempt as a device would: TCP to addr, TLS 1.3
// with cert (and the CA certificates it carries) trusting roots for the
// broker's certificate (serverName), then an MQTT 3.1.1 CONNECT with
// clientID, and reads the CONNACK. A broker refusing the client
// certificate answers with a TLS alert, which TLS 1.3 delivers after the
// client's side of the handshake: it shows on the first read.
func Connect(ctx context.Context, addr, serverName string, roots *x509.CertPool, cert tls.Certificate, clientID string) Attempt {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	d := tls.Dialer{Config: &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS12,
		// Always send the certificate, even one the broker's CA list does
		// not name (crypto/tls would otherwise send none).
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }}}
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		var ne *net.OpError
		if errors.As(err, &ne) && ne.Op == "dial" {
			return Attempt{Stage: "tcp", Detail: fmt.Sprintf("cannot reach %s: %v", addr, err)}
		}
		return Attempt{Stage: "tls", Detail: fmt.Sprintf("TLS handshake failed: %v", err)}
	}
	conn := raw.(*tls.Conn)
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := conn.Write(connectPacket(clientID)); err != nil {
		return Attempt{Stage: "tls", Detail: fmt.Sprintf("the broker closed the connection after the handshake: %v", err)}
	}
	var ack [4]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		var alert tls.AlertError
		if errors.As(err, &alert) || isRemoteAlert(err) {
			return Attempt{Stage: "tls", Detail: fmt.Sprintf("the broker refused the client certificate in the TLS handshake: %v", err)}
		}
		return Attempt{Stage: "connect", Detail: fmt.Sprintf("the broker closed the connection without a CONNACK: %v", err)}
	}
	if ack[0] != 0x20 || ack[1] != 2 {
		return Attempt{Stage: "connect", Detail: fmt.Sprintf("not a CONNACK: % x", ack)}
	}
	switch ack[3] {
	case 0:
		return Attempt{Accepted: true, Stage: "connect", Detail: "CONNACK 0: connection accepted"}
	case 2:
		return Attempt{Stage: "connect", Detail: "CONNACK 2: identifier rejected (the client ID is not the certificate's identity)"}
	case 4:
		return Attempt{Stage: "connect", Detail: "CONNACK 4: bad user name or password"}
	case 5:
		return Attempt{Stage: "connect", Detail: "CONNACK 5: not authorized"}
	}
	return Attempt{Stage: "connect", Detail: fmt.Sprintf("CONNACK %d: refused", ack[3])}
}

// isRemoteAlert: crypto/tls reports a received alert as "remote error:
// tls: ..." (an unexported type).
func isRemoteAlert(err error) bool {
	return err != nil && strings.HasPrefix(err.Error(), "remote error:")
}

// connectPacket is an MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s.
func connectPacket(clientID string) []byte {
	body := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, byte(len(clientID) >> 8), byte(len(clientID))}
	body = append(body, clientID...)
	pk := []byte{0x10}
	for n := len(body); ; {
		b := byte(n % 128)
		n /= 128
		if n > 0 {
			b |= 0x80
		}
		pk = append(pk, b)
		if n == 0 {
			break
		}
	}
	return append(pk, body...)
}
