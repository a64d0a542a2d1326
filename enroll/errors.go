package enroll

import (
	"errors"
	"net/http"
	"strconv"

	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
)

// Error is an API error: an HTTP status and a stable code for the caller,
// a public message, and the internal cause that is logged (and audited) but
// never sent.
type Error struct {
	Status int
	Code   string
	Msg    string
	Err    error
	// decided and full keep the refusal limiter's answer for this error
	// (Server.refusal).
	decided, full bool
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Code + ": " + e.Msg + ": " + e.Err.Error()
	}
	return e.Code + ": " + e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// apiErr builds an API error. code is a refusal reason of the fleet
// vocabulary (fleet.Reason), sent as the error's stable code.
func apiErr(status int, code fleet.Reason, msg string, cause error) *Error {
	return &Error{Status: status, Code: string(code), Msg: msg, Err: cause}
}

// asAPIError maps any error to an *Error; an unavailable record store
// becomes a 503 (retry later), other unknown errors 500s whose detail
// stays in the log.
func asAPIError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if errors.Is(err, registry.ErrUnavailable) {
		return apiErr(http.StatusServiceUnavailable, fleet.ReasonStoreUnavailable, "the registry's store is unavailable; retry later", err)
	}
	return apiErr(http.StatusInternalServerError, fleet.ReasonInternal, "internal error", err)
}

// RetryAfterSeconds is the Retry-After of a 503 (RFC 7030 4.2.3 for EST):
// a cluster store regains its quorum, or a node its place, within seconds.
const RetryAfterSeconds = 5

// setRetryAfter adds Retry-After to a 503.
func setRetryAfter(w http.ResponseWriter, e *Error) {
	if e.Status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", strconv.Itoa(RetryAfterSeconds))
	}
}
