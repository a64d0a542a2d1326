package ca

import "errors"

// Sentinel errors of the ca package.
var (
	// ErrAlreadyInitialized: Init found an existing CA and left it alone.
	ErrAlreadyInitialized = errors.New("ca: data directory already holds a CA; refusing to overwrite it")
	// ErrNotInitialized: Load found no CA; run `fleetgate init` first.
	ErrNotInitialized = errors.New("ca: no CA in data directory (run `fleetgate init`)")
	// ErrMalformedCSR: the CSR does not parse.
	ErrMalformedCSR = errors.New("ca: malformed CSR")
	// ErrCSRSignature: the CSR is not signed by the key it carries.
	ErrCSRSignature = errors.New("ca: CSR signature invalid")
	// ErrWeakKey: the CSR key is of a type or size the CA does not certify.
	ErrWeakKey = errors.New("ca: key type or size not allowed")
)
