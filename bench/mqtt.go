package bench

// A minimal MQTT 3.1.1 client codec: just what the load generator needs
// (CONNECT/CONNACK, PUBLISH QoS 0/1, PUBACK, SUBSCRIBE/SUBACK, DISCONNECT),
// written straight into reusable buffers so that the generator spends its
// share of the two cores on TLS, not on allocation.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// MQTT packet types (upper nibble of the fixed header).
const (
	pktConnect    = 1
	pktConnack    = 2
	pktPublish    = 3
	pktPuback     = 4
	pktSubscribe  = 8
	pktSuback     = 9
	pktPingresp   = 13
	pktDisconnect = 14
)

func appendVarint(b []byte, n int) []byte {
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		b = append(b, d)
		if n == 0 {
			return b
		}
	}
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// appendConnect appends a CONNECT (MQTT 3.1.1, clean session).
func appendConnect(b []byte, clientID string, keepalive uint16) []byte {
	rl := 10 + 2 + len(clientID)
	b = append(b, pktConnect<<4)
	b = appendVarint(b, rl)
	b = appendString(b, "MQTT")
	b = append(b, 4, 0x02)
	b = binary.BigEndian.AppendUint16(b, keepalive)
	return appendString(b, clientID)
}

// appendPublish appends a PUBLISH; id is used only for qos > 0.
func appendPublish(b []byte, topic string, qos byte, id uint16, payload []byte) []byte {
	rl := 2 + len(topic) + len(payload)
	if qos > 0 {
		rl += 2
	}
	b = append(b, pktPublish<<4|qos<<1)
	b = appendVarint(b, rl)
	b = appendString(b, topic)
	if qos > 0 {
		b = binary.BigEndian.AppendUint16(b, id)
	}
	return append(b, payload...)
}

func appendPuback(b []byte, id uint16) []byte {
	return binary.BigEndian.AppendUint16(append(b, pktPuback<<4, 2), id)
}

func appendSubscribe(b []byte, id uint16, filter string, qos byte) []byte {
	b = append(b, pktSubscribe<<4|0x02)
	b = appendVarint(b, 2+2+len(filter)+1)
	b = binary.BigEndian.AppendUint16(b, id)
	b = appendString(b, filter)
	return append(b, qos)
}

var pingreqPacket = []byte{12 << 4, 0}

var disconnectPacket = []byte{pktDisconnect << 4, 0}

// readPacket reads one packet into buf (grown if needed) and returns its
// first header byte and body.
func readPacket(r *bufio.Reader, buf []byte) (byte, []byte, error) {
	h, err := r.ReadByte()
	if err != nil {
		return 0, buf, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		c, err := r.ReadByte()
		if err != nil {
			return 0, buf, err
		}
		n += int(c&0x7f) * mul
		if c&0x80 == 0 {
			break
		}
		if i == 3 {
			return 0, buf, errors.New("mqtt: bad remaining length")
		}
		mul *= 128
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, buf, err
	}
	return h, buf, nil
}

// publishFields splits a PUBLISH body.
func publishFields(h byte, body []byte) (topic []byte, id uint16, payload []byte, err error) {
	if len(body) < 2 {
		return nil, 0, nil, errors.New("mqtt: short publish")
	}
	tl := int(binary.BigEndian.Uint16(body))
	if len(body) < 2+tl {
		return nil, 0, nil, errors.New("mqtt: short publish topic")
	}
	topic, rest := body[2:2+tl], body[2+tl:]
	if (h>>1)&3 > 0 {
		if len(rest) < 2 {
			return nil, 0, nil, errors.New("mqtt: short publish id")
		}
		id, rest = binary.BigEndian.Uint16(rest), rest[2:]
	}
	return topic, id, rest, nil
}

// Dialer opens mTLS MQTT connections to one broker.
type Dialer struct {
	Addr       string
	ServerName string
	Timeout    time.Duration
}

// Conn is one client connection after CONNACK.
type Conn struct {
	TLS     *tls.Conn
	R       *bufio.Reader
	Resumed bool
}

// ErrRefused is a CONNACK with a non-zero return code.
var ErrRefused = errors.New("mqtt: connection refused by CONNACK")

// Connect dials, does the TLS handshake with cfg, sends CONNECT and waits
// for CONNACK. readBuf sizes the connection's read buffer.
func (d *Dialer) Connect(ctx context.Context, cfg *tls.Config, clientID string, keepalive uint16, readBuf int) (*Conn, error) {
	to := d.Timeout
	if to == 0 {
		to = 15 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, to)
	defer cancel()
	var nd net.Dialer
	raw, err := nd.DialContext(ctx, "tcp", d.Addr)
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls: %w", err)
	}
	dl, _ := ctx.Deadline()
	tc.SetDeadline(dl)
	var pb [128]byte
	if _, err := tc.Write(appendConnect(pb[:0], clientID, keepalive)); err != nil {
		raw.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	br := bufio.NewReaderSize(tc, readBuf)
	h, body, err := readPacket(br, pb[:0])
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("connack: %w", err)
	}
	if h>>4 != pktConnack || len(body) < 2 {
		raw.Close()
		return nil, fmt.Errorf("connack: got packet type %d", h>>4)
	}
	if body[1] != 0 {
		raw.Close()
		return nil, fmt.Errorf("%w: code %d", ErrRefused, body[1])
	}
	tc.SetDeadline(time.Time{})
	return &Conn{TLS: tc, R: br, Resumed: tc.ConnectionState().DidResume}, nil
}

// Disconnect sends DISCONNECT, waits (bounded) for the broker to close, and
// closes: the broker closes first, so TIME_WAIT stays on its side and the
// generator's ephemeral ports are not exhausted by a churn of connections.
func (c *Conn) Disconnect() {
	c.TLS.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.TLS.Write(disconnectPacket); err == nil {
		var b [64]byte
		for range 16 {
			if _, err := c.R.Read(b[:]); err != nil {
				break
			}
		}
	}
	c.TLS.Close()
}

// Subscribe sends SUBSCRIBE and waits for SUBACK granting it.
func (c *Conn) Subscribe(filter string, qos byte) error {
	c.TLS.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.TLS.SetDeadline(time.Time{})
	if _, err := c.TLS.Write(appendSubscribe(nil, 1, filter, qos)); err != nil {
		return err
	}
	for range 100 {
		h, body, err := readPacket(c.R, nil)
		if err != nil {
			return err
		}
		if h>>4 == pktSuback {
			if len(body) < 3 || body[2] == 0x80 {
				return fmt.Errorf("subscribe %s refused", filter)
			}
			return nil
		}
	}
	return errors.New("no SUBACK")
}
