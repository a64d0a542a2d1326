package attest

import "sync"

// decodeCacheSize bounds each cache of decoded public areas and verified
// AKs. Only inputs that decoded (and, for AKs, passed every check) are
// remembered.
const decodeCacheSize = 1024

var (
	// publics remembers decodePublic's results by their exact bytes.
	publics = newByteCache[*publicArea](decodeCacheSize)
	// aks remembers VerifyAK's results by their exact bytes.
	aks = newByteCache[*AK](decodeCacheSize)
)

// byteCache maps exact byte strings to immutable results of a pure function
// of them, holding at most max entries (when full, an arbitrary one is
// forgotten). Safe for concurrent use.
type byteCache[V any] struct {
	max int
	mu  sync.Mutex
	m   map[string]V
}

func newByteCache[V any](max int) *byteCache[V] {
	return &byteCache[V]{max: max, m: make(map[string]V)}
}

func (c *byteCache[V]) get(b []byte) (V, bool) {
	c.mu.Lock()
	v, ok := c.m[string(b)]
	c.mu.Unlock()
	return v, ok
}

func (c *byteCache[V]) put(b []byte, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[string(b)]; !ok && len(c.m) >= c.max {
		for k := range c.m {
			delete(c.m, k)
			break
		}
	}
	c.m[string(b)] = v
}

func (c *byteCache[V]) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
