package enroll

import (
	"crypto/rand"
	"errors"
	"testing"
	"time"
)

type testClock struct{ t time.Time }

func (c *testClock) now() time.Time { return c.t }

func TestChallengeStore(t *testing.T) {
	clock := &testClock{t: time.Unix(1_900_000_000, 0)}
	s := newChallengeStore(clock.now, rand.Reader, time.Minute, 3)
	put := func() *challenge {
		t.Helper()
		c := &challenge{secret: []byte("0123456789abcdef0123456789abcdef"), deviceID: "dev"}
		if err := s.put(c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	good := []byte("0123456789abcdef0123456789abcdef")

	t.Run("a challenge is taken once with the right secret", func(t *testing.T) {
		c := put()
		if len(c.id) != 32 {
			t.Fatalf("ID %q", c.id)
		}
		if got, err := s.take(c.id, good); err != nil || got != c {
			t.Fatalf("take: %v", err)
		}
		if _, err := s.take(c.id, good); !errors.Is(err, errChallengeUnknown) {
			t.Fatalf("second take: %v, want unknown", err)
		}
	})
	t.Run("a wrong secret consumes the challenge", func(t *testing.T) {
		c := put()
		if _, err := s.take(c.id, []byte("0123456789abcdef0123456789abcdeX")); !errors.Is(err, errWrongSecret) {
			t.Fatalf("wrong secret: %v", err)
		}
		if _, err := s.take(c.id, good); !errors.Is(err, errChallengeUnknown) {
			t.Fatalf("after a wrong secret: %v, want unknown", err)
		}
	})
	t.Run("a secret of another length is wrong", func(t *testing.T) {
		c := put()
		if _, err := s.take(c.id, good[:16]); !errors.Is(err, errWrongSecret) {
			t.Fatalf("short secret: %v", err)
		}
	})
	t.Run("an expired challenge is refused and gone", func(t *testing.T) {
		c := put()
		clock.t = clock.t.Add(time.Minute)
		if _, err := s.take(c.id, good); !errors.Is(err, errChallengeExpired) {
			t.Fatalf("expired: %v", err)
		}
		if _, err := s.take(c.id, good); !errors.Is(err, errChallengeUnknown) {
			t.Fatalf("replay of expired: %v", err)
		}
	})
	t.Run("the store is bounded and expired entries are swept to make room", func(t *testing.T) {
		for range 3 {
			put()
		}
		if err := s.put(&challenge{}); !errors.Is(err, errChallengesFull) {
			t.Fatalf("fourth put: %v, want full", err)
		}
		clock.t = clock.t.Add(2 * time.Minute)
		put()
		if n := s.len(); n != 1 {
			t.Fatalf("%d challenges after the sweep, want 1", n)
		}
	})
}
