package auth

import (
	"hash/maphash"
	"strings"
	"sync/atomic"

	"github.com/fleetgate/fleetgate/broker/acl"
	"github.com/fleetgate/fleetgate/identity"
)

// aclCache holds a session's recent allowed ACL decisions, so that a
// device publishing to its telemetry topic, or a service receiving the
// fleet's telemetry, is not evaluated anew for every message: the directory
// look-ups (certificate, device state, group, tags) and the policy's rules
// were most of the hook's cost per message.
//
// A decision is reused only while the directory's generation (bumped by
// every change of a certificate, device or principal: revocation,
// suspension, a group or tag change) and the policy in force are those it
// was made under, and while the session's certificate has not expired
// (checked on every use, as subject does). Denials are never cached: each
// one is evaluated, counted and logged as before.
//
// The publish side has one entry (a device publishes to few topics, often
// one); the delivery side a small table indexed by a hash of the topic,
// allocated at the session's first delivery: a collision only costs an
// evaluation. Entries are replaced atomically; no lock.
type aclCache struct {
	pub  atomic.Pointer[aclEntry]
	subs atomic.Pointer[[]atomic.Pointer[aclEntry]]
}

type aclEntry struct {
	gen    uint64
	policy *acl.Policy
	topic  string
}

// Delivery-side table sizes: a service receives the topics of many
// devices; a device, its commands.
const (
	aclSlotsService = 1024
	aclSlotsDevice  = 4
)

var aclSeed = maphash.MakeSeed()

// slot returns where the decision for (write, topic) is kept.
func (c *aclCache) slot(write bool, topic string, role identity.Role) *atomic.Pointer[aclEntry] {
	if write {
		return &c.pub
	}
	t := c.subs.Load()
	if t == nil {
		n := aclSlotsService
		if role == identity.RoleDevice {
			n = aclSlotsDevice
		}
		nt := make([]atomic.Pointer[aclEntry], n)
		if !c.subs.CompareAndSwap(nil, &nt) {
			t = c.subs.Load()
		} else {
			t = &nt
		}
	}
	return &(*t)[maphash.String(aclSeed, topic)%uint64(len(*t))]
}

// maxCachedTopic bounds the topics whose decision is cached (as the fork's
// subscribers cache does, patch 2): a longer one is evaluated every time,
// so that a session's cache holds at most its slots × this many bytes
// however many long, distinct topics a publisher sends.
const maxCachedTopic = 256

// storeAllowed records in slot that topic is allowed under gen and p: on a
// copy of topic, because mochi decodes a topic name in place, sharing the
// packet's buffer (payload included), which the cache must not keep alive.
func storeAllowed(slot *atomic.Pointer[aclEntry], gen uint64, p *acl.Policy, topic string) {
	if len(topic) > maxCachedTopic {
		return
	}
	slot.Store(&aclEntry{gen: gen, policy: p, topic: strings.Clone(topic)})
}

// hit reports whether e allows topic under generation gen and policy p.
func (e *aclEntry) hit(topic string, gen uint64, p *acl.Policy) bool {
	return e != nil && e.gen == gen && e.policy == p && e.topic == topic
}
