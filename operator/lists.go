package operator

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/fleetgate/fleetgate/api"
	"github.com/fleetgate/fleetgate/enroll"
	"github.com/fleetgate/fleetgate/enroll/registry"
	"github.com/fleetgate/fleetgate/fleet"
)

// page is one page of a list sorted by key: the items after ?after=, at
// most ?limit= of them (default and at most api.MaxListLimit).
type page struct {
	limit int
	after string
}

// readPage reads ?limit= and ?after=; a bad limit is a 400.
func readPage(r *http.Request) (page, error) {
	p := page{limit: api.MaxListLimit, after: r.URL.Query().Get("after")}
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return p, apiErr(http.StatusBadRequest, "invalid_limit", "limit must be a positive number", err)
		}
		p.limit = min(n, api.MaxListLimit)
	}
	return p, nil
}

// cut returns the page of items (sorted by key) p selects.
func cut[T any](p page, items []T, key func(T) string) []T {
	out := make([]T, 0, min(len(items), p.limit))
	for _, it := range items {
		if len(out) == p.limit {
			break
		}
		if p.after != "" && cmp.Compare(key(it), p.after) <= 0 {
			continue
		}
		out = append(out, it)
	}
	return out
}

// notFound is the 404 of a named thing: "device sensor-1 not found".
func notFound(kind, name string, cause error) error {
	return apiErr(http.StatusNotFound, fleet.ReasonNotFound, fmt.Sprintf("%s %s not found", kind, name), cause)
}

// fail writes err; a registry's ErrNotFound names kind and name.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error, kind, name string) {
	dev := ""
	if kind == "device" {
		dev = name
	}
	s.enroll.WriteError(w, r, toAPIError(err, kind, name), dev)
}

// toAPIError makes err an API error: a registry's "not found" names what
// is missing (kind name), other registry errors are mapped.
func toAPIError(err error, kind, name string) *enroll.Error {
	if errors.Is(err, registry.ErrNotFound) && kind != "" {
		err = notFound(kind, name, err)
	}
	var e *enroll.Error
	if !errors.As(err, &e) {
		err = registryError(err)
	}
	return asAPIError(err)
}

// badRequest writes a 400 with code and message.
func (s *Server) badRequest(w http.ResponseWriter, r *http.Request, code, msg string, cause error) {
	s.enroll.WriteError(w, r, apiErr(http.StatusBadRequest, fleet.Reason(code), msg, cause), "")
}
