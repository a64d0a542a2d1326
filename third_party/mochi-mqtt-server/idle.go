package mqtt

import (
	"bufio"
	"sync"
)

// fleetgate patch 28: an idle connection waits for its next bytes in a
// shallow frame and without its read buffer (FORK.md).

// IdleWaiter is implemented by a client connection that can tell whether
// it holds bytes already taken from the network (for TLS: a record read or
// decrypted but not yet consumed) and can wait for the network to become
// readable without entering its protocol's read path. The read loop uses it
// when its own buffer is empty: a goroutine that waits deep inside a TLS
// read keeps a stack the runtime cannot shrink, and its read buffer, for
// as long as the connection is idle.
type IdleWaiter interface {
	// Buffered reports whether the next Read returns bytes without
	// waiting for the network. A non-nil error is the error Read would
	// have returned (the read loop ends with it).
	Buffered() (bool, error)
	// WaitReadable blocks until the network has bytes for the connection,
	// its read deadline passes or it fails; the error is the one Read
	// would have returned. The bytes stay readable by Read.
	WaitReadable() error
}

// idleReaders holds the read buffers of idle connections' read loops.
var idleReaders sync.Pool // of *bufio.Reader

// waitIdle waits, through w, for the next bytes of a connection whose read
// buffer is empty; while the network has none, the buffer goes back to the
// pool. It is not inlined, and what it calls around the wait is not either:
// the frames below a waiting read loop stay under the quarter of an 8 KiB
// stack that lets the runtime halve it (with the runtime's own frames and
// its reserve of 800 bytes, the wait needed 2.1 KiB with the pool handling
// inlined here).
//
//go:noinline
func (cl *Client) waitIdle(w IdleWaiter) error {
	ready, err := w.Buffered()
	if err != nil || ready {
		return err
	}
	size := cl.releaseReader()
	err = w.WaitReadable()
	cl.takeReader(size)
	return err
}

// releaseReader puts the read buffer back in the pool and returns its size.
//
//go:noinline
func (cl *Client) releaseReader() int {
	br := cl.Net.bconn
	size := br.Size()
	br.Reset(nil)
	idleReaders.Put(br)
	cl.Net.bconn = nil
	return size
}

// takeReader gives the read loop a read buffer of the size it had.
//
//go:noinline
func (cl *Client) takeReader(size int) {
	br, _ := idleReaders.Get().(*bufio.Reader)
	if br == nil || br.Size() != size {
		br = bufio.NewReaderSize(cl.Net.Conn, size)
	} else {
		br.Reset(cl.Net.Conn)
	}
	cl.Net.bconn = br
}
