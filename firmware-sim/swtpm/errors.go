package swtpm

import "errors"

// Sentinel errors returned (wrapped) by this package. Test with errors.Is.
var (
	// ErrNotInstalled means swtpm or swtpm_setup (or swtpm_localca) is not
	// on PATH.
	ErrNotInstalled = errors.New("swtpm: binaries not installed")
	// ErrManufacturerExists means NewManufacturer found an existing
	// manufacturer CA in its directory; use LoadManufacturer instead.
	ErrManufacturerExists = errors.New("swtpm: manufacturer already exists")
	// ErrManufacturerInvalid means the manufacturer files in a directory are
	// missing or do not form a CA key and matching certificate.
	ErrManufacturerInvalid = errors.New("swtpm: manufacturer files invalid")
	// ErrSetupFailed means swtpm_setup exited with an error; the wrapping
	// error carries its output.
	ErrSetupFailed = errors.New("swtpm: swtpm_setup failed")
	// ErrNotReady means swtpm did not answer on its socket before the
	// deadline (or the context ended).
	ErrNotReady = errors.New("swtpm: not ready")
	// ErrExited means the swtpm process exited before it became ready.
	ErrExited = errors.New("swtpm: process exited")
	// ErrInvalidOptions means Start was called with incomplete Options.
	ErrInvalidOptions = errors.New("swtpm: invalid options")
)
