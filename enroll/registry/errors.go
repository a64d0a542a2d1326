package registry

import "errors"

// Sentinel errors of the registry. Callers test them with errors.Is.
var (
	// ErrNotFound: no such device, certificate or token.
	ErrNotFound = errors.New("registry: not found")
	// ErrTokenUnknown: no token with this ID, or its secret does not match.
	ErrTokenUnknown = errors.New("registry: unknown token")
	// ErrTokenExpired: the token's lifetime is over.
	ErrTokenExpired = errors.New("registry: token expired")
	// ErrTokenUsed: the token was already redeemed (single use).
	ErrTokenUsed = errors.New("registry: token already used")
	// ErrTokenExists: a token with this ID is already stored.
	ErrTokenExists = errors.New("registry: token ID already exists")
	// ErrTokenDevice: the token was minted for another device.
	ErrTokenDevice = errors.New("registry: token bound to another device")
	// ErrDeviceRevoked: the device is revoked; nothing is issued for it.
	ErrDeviceRevoked = errors.New("registry: device revoked")
	// ErrDeviceSuspended: the device is suspended.
	ErrDeviceSuspended = errors.New("registry: device suspended")
	// ErrDuplicateSerial: a certificate with this serial is already recorded.
	ErrDuplicateSerial = errors.New("registry: duplicate serial")
	// ErrTPMBound: the device has a registered EK and enrolls by TPM
	// attestation only.
	ErrTPMBound = errors.New("registry: device is bound to a TPM")
	// ErrNameTaken: device IDs and service/operator names share one
	// namespace (they are MQTT client IDs).
	ErrNameTaken = errors.New("registry: name already taken")
	// ErrRenewalTooSoon: the device renewed less than the minimum interval
	// ago, or not from its current certificate.
	ErrRenewalTooSoon = errors.New("registry: renewal refused")
	// ErrConflict: a concurrent transaction changed the same records; the
	// caller may retry.
	ErrConflict = errors.New("registry: concurrent update, retry")
)
