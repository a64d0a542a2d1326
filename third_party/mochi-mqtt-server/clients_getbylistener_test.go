package mqtt

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// fleetgate patch 19: GetByListener (called when a listener closes) while
// clients disconnect (Delete) must not deadlock. Before the patch it took
// the read lock twice, and a writer queued between the two blocked both
// for ever (seen as a broker that never finished closing).
func TestGetByListenerWithWriters(t *testing.T) {
	cls := NewClients()
	for i := 0; i < 64; i++ {
		cls.Add(&Client{ID: fmt.Sprint(i), Net: ClientConnection{Listener: "t1"}})
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < 20000; i++ {
			cls.GetByListener("t1")
			_ = i
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < 20000; i++ {
			id := fmt.Sprint(i % 64)
			cls.Delete(id)
			cls.Add(&Client{ID: id, Net: ClientConnection{Listener: "t1"}})
		}
	}()
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("GetByListener and Delete deadlocked")
	}
}
