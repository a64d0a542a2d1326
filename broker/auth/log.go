package auth

import ()

// logRefusal reports whether a per-packet refusal of identity id may be
// logged (Options.LogRefusal).
func (h *Hook) logRefusal(id string) bool {
	return h.o.LogRefusal == nil || h.o.LogRefusal(id)
}

func sessionName(s *Session) string {
	if s == nil {
		return ""
	}
	return s.Identity.String()
}
