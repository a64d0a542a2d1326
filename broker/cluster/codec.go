package cluster

import (
	"strings"
)

// The topic codec maps an MQTT topic to a NATS subject and back, level by
// level: an MQTT level becomes one NATS token. A NATS token may not be
// empty, hold '.', white space, or be '*' or '>', while an MQTT level may
// be any UTF-8 but '/', '+' and '#' (and may be empty). So every byte
// outside [A-Za-z0-9_-] is written ~HH (hex, upper case), and an empty
// level is the token "~" alone; decoding reverses both. In a filter, '+'
// becomes '*' and '#' becomes '>'.
//
// An encoded subject is <prefix>.<qos>.<levels>: the QoS token lets a node
// subscribe to both QoS 0 (core NATS) and QoS 1/2 (captured by the stream
// as well) with one subject per filter.

// escape is the escape byte of the codec.
const escape = '~'

const hexDigits = "0123456789ABCDEF"

func safe(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-'
}

// encodeLevel writes one MQTT level as one NATS token.
func encodeLevel(b *strings.Builder, level string) {
	if level == "" {
		b.WriteByte(escape)
		return
	}
	for i := 0; i < len(level); i++ {
		c := level[i]
		if safe(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte(escape)
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&0xF])
	}
}

// EncodeTopic returns the NATS tokens of an MQTT topic (no wildcards),
// joined by '.'.
func EncodeTopic(topic string) string {
	var b strings.Builder
	b.Grow(len(topic) + 8)
	for i, level := range strings.Split(topic, "/") {
		if i > 0 {
			b.WriteByte('.')
		}
		encodeLevel(&b, level)
	}
	return b.String()
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// DecodeTopic reverses EncodeTopic; ok is false for tokens it could not
// have written.
func DecodeTopic(tokens string) (string, bool) {
	var b strings.Builder
	b.Grow(len(tokens))
	for i, tok := range strings.Split(tokens, ".") {
		if i > 0 {
			b.WriteByte('/')
		}
		if tok == string(escape) {
			continue
		}
		if tok == "" {
			return "", false
		}
		for j := 0; j < len(tok); j++ {
			c := tok[j]
			if safe(c) {
				b.WriteByte(c)
				continue
			}
			if c != escape || j+2 >= len(tok) {
				return "", false
			}
			hi, ok1 := unhex(tok[j+1])
			lo, ok2 := unhex(tok[j+2])
			if !ok1 || !ok2 {
				return "", false
			}
			b.WriteByte(hi<<4 | lo)
			j += 2
		}
	}
	return b.String(), true
}

// EncodeFilter returns the NATS subject patterns (tokens, without prefix)
// that together receive every topic the MQTT filter matches: one, or two
// for a filter ending in '#' below the root ("a/#" also matches "a", which
// NATS's "a.>" does not). A shared subscription ($share/group/filter) is
// its filter. They may receive more than the filter matches (a '$' topic
// under a leading wildcard): the broker matches each message again.
func EncodeFilter(filter string) []string {
	if rest, ok := strings.CutPrefix(filter, "$share/"); ok {
		if _, f, ok := strings.Cut(rest, "/"); ok {
			filter = f
		}
	}
	levels := strings.Split(filter, "/")
	var b strings.Builder
	for i, level := range levels {
		if i > 0 {
			b.WriteByte('.')
		}
		switch level {
		case "+":
			b.WriteByte('*')
		case "#":
			b.WriteByte('>')
		default:
			encodeLevel(&b, level)
		}
	}
	s := b.String()
	if len(levels) > 1 && levels[len(levels)-1] == "#" {
		return []string{s, strings.TrimSuffix(s, ".>")}
	}
	return []string{s}
}
