package broker

import "errors"

// An idle MQTT connection waits for its next bytes outside crypto/tls
// (mochi patch 28, mqtt.IdleWaiter): a read loop parked inside a TLS read
// holds an 8 KiB stack that the runtime cannot shrink, and mochi's read
// buffer, for as long as the device stays quiet. conn tells mochi whether
// crypto/tls holds bytes already read from the socket, and waits for the
// socket itself to become readable by reading one byte from it, which the
// next TLS read takes first.

// errNothingBuffered is what the raw connection answers crypto/tls while
// conn.Buffered probes it: a temporary net.Error, which crypto/tls returns
// without making it the connection's permanent error.
var errNothingBuffered = probeError{}

type probeError struct{}

func (probeError) Error() string   { return "no bytes buffered" }
func (probeError) Timeout() bool   { return true }
func (probeError) Temporary() bool { return true }

// Read is the raw connection's read under crypto/tls: first the byte that
// WaitReadable took from the socket; while probing, nothing.
func (c *admittedConn) Read(p []byte) (int, error) {
	if c.held && len(p) > 0 {
		p[0], c.held = c.one[0], false
		return 1, nil
	}
	if c.probing {
		return 0, errNothingBuffered
	}
	return c.Conn.Read(p)
}

// Read is the TLS connection's read under mochi: first the byte that
// Buffered took from crypto/tls.
func (c *conn) Read(p []byte) (int, error) {
	if c.held && len(p) > 0 {
		p[0], c.held = c.one[0], false
		return 1, nil
	}
	return c.Conn.Read(p)
}

// Buffered reports whether crypto/tls holds bytes of the connection already
// read from the socket (decrypted, or a whole record), by reading one with
// the socket answering "nothing" (errNothingBuffered): a byte read is held
// for the next Read; any other error is the connection's.
func (c *conn) Buffered() (bool, error) {
	if c.held || c.raw.held {
		return true, nil
	}
	c.raw.probing = true
	n, err := c.Conn.Read(c.one[:])
	c.raw.probing = false
	if n > 0 {
		c.held = true
		return true, nil
	}
	if errors.Is(err, errNothingBuffered) {
		return false, nil
	}
	return false, err
}

// WaitReadable waits for the socket to have bytes (or for the read deadline,
// which mochi moves with the keepalive, or the connection's end) by reading
// one byte from it, held for crypto/tls's next read.
func (c *conn) WaitReadable() error {
	if c.held || c.raw.held {
		return nil
	}
	n, err := c.raw.Conn.Read(c.raw.one[:])
	if n > 0 {
		c.raw.held = true
		return nil
	}
	return err
}
