// Package tpmkey keeps a device's keys inside its TPM 2.0 and exposes them
// to the enrollment flow: the endorsement key (EK) and its certificate, an
// attestation key (AK), and a TLS client key usable as a crypto.Signer.
//
// It uses go-tpm's tpm2 API. Keys are created under the owner-hierarchy
// storage root key (the TCG ECC P-256 SRK template), which is recreated on
// demand, so nothing needs to be persisted in the TPM. Only the TPM-wrapped
// key blobs (TPM2B_PUBLIC, TPM2B_PRIVATE encrypted by the SRK) are stored in a
// state directory.
//
// All commands to one TPM are serialised by a mutex, because transports are
// not safe for concurrent use and a TPM has few object slots (swtpm: three).
// Every operation loads what it needs and flushes it before returning.
//
// Known limitations: sessions are unsalted password sessions (the keys have
// empty authorization values), so a bus or socket eavesdropper sees command
// parameters such as digests and credential secrets; the TPM is trusted to be
// the one the transport leads to.
package tpmkey

import (
	"fmt"
	"os"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
)

// TPM is an open TPM. Its methods are safe for concurrent use.
type TPM struct {
	mu     sync.Mutex // serialises every command and guards tr
	tr     transport.TPMCloser
	closed bool
}

// Open opens the TPM at path: a unix socket (swtpm, via linuxudstpm) or a
// character device such as /dev/tpmrm0 (via linuxtpm). Prefer the kernel
// resource manager (/dev/tpmrm0) over /dev/tpm0 on real hardware.
func Open(path string) (*TPM, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("tpmkey: open %s: %w", path, err)
	}
	var tr transport.TPMCloser
	switch mode := fi.Mode(); {
	case mode&os.ModeSocket != 0:
		tr, err = linuxudstpm.Open(path)
	case mode&os.ModeDevice != 0 && mode&os.ModeCharDevice != 0:
		tr, err = linuxtpm.Open(path)
	default:
		return nil, fmt.Errorf("tpmkey: open %s (%s): %w", path, mode, ErrUnsupportedPath)
	}
	if err != nil {
		return nil, fmt.Errorf("tpmkey: open %s: %w", path, err)
	}
	return OpenTransport(tr), nil
}

// OpenTransport wraps an already open transport. The TPM takes ownership:
// Close closes tr.
func OpenTransport(tr transport.TPMCloser) *TPM {
	return &TPM{tr: tr}
}

// Close closes the transport. Later calls return ErrClosed.
func (t *TPM) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	t.closed = true
	if err := t.tr.Close(); err != nil {
		return fmt.Errorf("tpmkey: close: %w", err)
	}
	return nil
}

// do runs f with exclusive use of the transport.
func (t *TPM) do(f func(tr transport.TPM) error) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	return f(t.tr)
}

// flush flushes a transient handle. Errors are ignored: the handle is gone
// with the next TPM reset anyway, and the caller's own error matters more.
func flush(tr transport.TPM, h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tr)
}
