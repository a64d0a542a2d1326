package api

import "time"

// PathAdminConsoleLogin mints a one-time sign-in link of the web console
// for the calling operator (`fleetgate console login`).
const PathAdminConsoleLogin = "/v1/admin/console/login"

// ConsoleLoginResponse is a one-time sign-in link of the web console: it
// works once, until ExpiresAt, and signs its opener in as the operator
// whose certificate minted it.
type ConsoleLoginResponse struct {
	URL       string    `json:"url"`
	ExpiresAt time.Time `json:"expires_at"`
	Operator  string    `json:"operator"`
}
