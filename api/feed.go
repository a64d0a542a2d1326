package api

import "time"

// PathAdminFeed is the registry change feed a broker running in its own
// process follows (operator mTLS): GET ?epoch=E&since=V&wait=25s.
const PathAdminFeed = "/v1/admin/feed"

// Feed is one answer of the change feed: either a full snapshot, or the
// entries changed after the requested version, with their current values.
type Feed struct {
	Epoch    string       `json:"epoch"`
	Version  uint64       `json:"version"`
	Snapshot bool         `json:"snapshot"`
	Certs    []FeedCert   `json:"certs,omitempty"`
	Devices  []FeedDevice `json:"devices,omitempty"`
}

// FeedCert is the status of one certificate serial.
type FeedCert struct {
	Serial   string    `json:"serial"`
	Role     string    `json:"role"`
	Name     string    `json:"name"`
	NotAfter time.Time `json:"not_after"`
	Revoked  bool      `json:"revoked,omitempty"`
}

// FeedDevice is the status of one device.
type FeedDevice struct {
	ID    string            `json:"id"`
	Group string            `json:"group"`
	State string            `json:"state"`
	Tags  map[string]string `json:"tags,omitempty"`
	// Method is the device's attestation method (token, tpm).
	Method string `json:"attestation_method,omitempty"`
}
