package ca

import "strings"

// CRL reason codes (RFC 5280 section 5.3.1) by their names. A revocation
// reason stored as "<name>: <text>" (operator API) puts the code in the
// CRL entry; any other reason is unspecified (no reasonCode extension).
var ReasonCodes = map[string]int{
	"unspecified":          0,
	"keyCompromise":        1,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
	"certificateHold":      6,
	"privilegeWithdrawn":   9,
}

// ReasonCodeOf returns the CRL reason code of a stored revocation reason.
func ReasonCodeOf(reason string) int {
	name, _, ok := strings.Cut(reason, ":")
	if !ok {
		return 0
	}
	return ReasonCodes[strings.TrimSpace(name)]
}

// InferReasonCode returns the name of the reason code a free-text reason
// means ("stolen" is keyCompromise, "decommissioned" is
// cessationOfOperation), or "" when it says nothing known.
func InferReasonCode(text string) string {
	t := strings.ToLower(text)
	for _, m := range []struct{ code, words string }{
		{"keyCompromise", "stolen theft compromis leak lost tamper"},
		{"cessationOfOperation", "decommission retire scrap end of life eol broken"},
		{"superseded", "supersede replaced rotat"},
		{"affiliationChanged", "sold transfer new owner"},
	} {
		for _, w := range strings.Fields(m.words) {
			if strings.Contains(t, w) {
				return m.code
			}
		}
	}
	return ""
}
