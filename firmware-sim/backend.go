package sim

// What the simulated backend service receives (setup connects it): every
// (device, sequence) that arrived, and the devices' answers to commands.

import (
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// receiver is the backend's view: which (device, seq) arrived, and when.
type receiver struct {
	mu     sync.Mutex
	got    map[string]map[int64]time.Time
	first  time.Time
	pongs  chan string
	events atomic.Int64
	// pongFrom: each device's answers, by command name.
	pongFrom map[string]map[string]bool
}

type telemetry struct {
	Device string `json:"device"`
	Seq    int64  `json:"seq"`
	Kind   string `json:"kind"`
	Cmd    string `json:"cmd,omitempty"` // of a pong: the command's name
	Pad    []byte `json:"pad,omitempty"`
}

func (rc *receiver) handle(_ paho.Client, m paho.Message) {
	var tm telemetry
	if json.Unmarshal(m.Payload(), &tm) != nil {
		return
	}
	if tm.Kind == "pong" {
		rc.mu.Lock()
		if rc.pongFrom == nil {
			rc.pongFrom = map[string]map[string]bool{}
		}
		if rc.pongFrom[tm.Device] == nil {
			rc.pongFrom[tm.Device] = map[string]bool{}
		}
		rc.pongFrom[tm.Device][tm.Cmd] = true
		rc.mu.Unlock()
		select {
		case rc.pongs <- tm.Device:
		default:
		}
		return
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.got[tm.Device] == nil {
		rc.got[tm.Device] = map[int64]time.Time{}
	}
	if _, dup := rc.got[tm.Device][tm.Seq]; !dup {
		rc.got[tm.Device][tm.Seq] = time.Now()
	}
	if rc.first.IsZero() {
		rc.first = time.Now()
	}
}

func (rc *receiver) has(id string, seq int64) bool {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	_, ok := rc.got[id][seq]
	return ok
}

func (rc *receiver) count() int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	n := 0
	for _, m := range rc.got {
		n += len(m)
	}
	return int64(n)
}

// maxSeq is the highest sequence received from id.
func (rc *receiver) maxSeq(id string) int64 {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	var m int64 = -1
	for s := range rc.got[id] {
		m = max(m, s)
	}
	return m
}

// answered reports whether device id answered the command named cmd.
func (rc *receiver) answered(id, cmd string) bool {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.pongFrom[id][cmd]
}
