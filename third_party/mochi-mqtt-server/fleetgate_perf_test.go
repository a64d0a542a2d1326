package mqtt

// Tests of fleetgate's per-message patches 20-24 (FORK.md).

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/packets"
)

// countingHook provides OnPacketRead and OnPacketSent and counts how often
// it is asked what it provides and how often it is called.
type countingHook struct {
	HookBase
	asked, read, sent atomic.Int64
}

func (h *countingHook) ID() string { return "counting" }

func (h *countingHook) Provides(b byte) bool {
	h.asked.Add(1)
	return b == OnPacketRead || b == OnPacketSent
}

func (h *countingHook) OnPacketRead(_ *Client, pk packets.Packet) (packets.Packet, error) {
	h.read.Add(1)
	return pk, nil
}

func (h *countingHook) OnPacketSent(_ *Client, _ packets.Packet, _ []byte) { h.sent.Add(1) }

// Patch 20: a hook is asked what it provides when it is added, not at every
// dispatch; dispatch calls the hooks that provide the event, in order.
func TestHookDispatchByEvent(t *testing.T) {
	h := new(Hooks)
	require.False(t, h.Provides(OnPacketRead)) // no hooks yet
	require.Empty(t, h.providing(OnPacketRead))
	a, b := new(countingHook), new(countingHook)
	require.NoError(t, h.Add(a, nil))
	require.NoError(t, h.Add(new(HookBase), nil)) // provides nothing
	require.NoError(t, h.Add(b, nil))
	askedA, askedB := a.asked.Load(), b.asked.Load()
	require.NotZero(t, askedA)

	for i := 0; i < 100; i++ {
		_, err := h.OnPacketRead(nil, packets.Packet{})
		require.NoError(t, err)
		h.OnPacketSent(nil, packets.Packet{}, nil)
		require.True(t, h.OnACLCheck(nil, "a", true) == false) // nobody provides it: denied
	}
	require.EqualValues(t, 100, a.read.Load())
	require.EqualValues(t, 100, b.read.Load())
	require.EqualValues(t, 100, b.sent.Load())
	require.Equal(t, askedA, a.asked.Load(), "asked again after Add")
	require.Equal(t, askedB, b.asked.Load(), "asked again after Add")
	require.Equal(t, []Hook{a, b}, h.providing(OnPacketRead))
	require.True(t, h.Provides(OnConnect, OnPacketSent))
	require.False(t, h.Provides(OnConnect, OnWill))
	require.False(t, h.Provides(255))
}

// deadlineConn records the deadlines set on it.
type deadlineConn struct {
	net.Conn
	set []time.Time
}

func (c *deadlineConn) SetDeadline(t time.Time) error {
	c.set = append(c.set, t)
	return c.Conn.SetDeadline(t)
}

// Patch 21: the read loop moves the deadline at most once per
// deadlineSlack, always to at least 1.5 × keepalive after now; a change of
// keepalive moves it at once.
func TestDeadlineCoarseNeverEarly(t *testing.T) {
	r, w := net.Pipe()
	defer r.Close()
	dc := &deadlineConn{Conn: w}
	cl, _, _ := newTestClient()
	cl.Net.Conn = dc
	start := time.Now()
	for i := 0; i < 50; i++ {
		now := time.Now()
		cl.refreshDeadlineCoarse(10)
		last := dc.set[len(dc.set)-1]
		require.False(t, last.Before(now.Add(15*time.Second)), "deadline earlier than 1.5 × keepalive after a packet")
		require.False(t, last.After(time.Now().Add(15*time.Second+deadlineSlack)))
	}
	// 50 packets: moved once per deadlineSlack (once, unless the loop was
	// descheduled for longer)
	moves := len(dc.set)
	require.LessOrEqual(t, moves, 1+int(time.Since(start)/deadlineSlack))
	cl.refreshDeadlineCoarse(20) // keepalive changed: moved at once
	require.Len(t, dc.set, moves+1)
	cl.refreshDeadlineCoarse(0)
	require.Len(t, dc.set, moves+2)
	require.True(t, dc.set[moves+1].IsZero()) // keepalive 0: no deadline
	cl.State.deadlineMoved -= int64(deadlineSlack)
	cl.refreshDeadlineCoarse(0)
	require.Len(t, dc.set, moves+3)
}

// Patch 21: packets are decoded in their own buffer, so each keeps its
// payload when the next is read.
func TestDeadlineCoarseReadKeepsPayloads(t *testing.T) {
	cl, r, _ := newTestClient()
	defer cl.Stop(errClientStop)
	var in bytes.Buffer
	for _, p := range []string{"first", "second", "third"} {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: []byte(p)}
		require.NoError(t, pk.PublishEncode(&in))
	}
	go func() { _, _ = r.Write(in.Bytes()) }()
	var got []packets.Packet
	for i := 0; i < 3; i++ {
		fh := new(packets.FixedHeader)
		require.NoError(t, cl.ReadFixedHeader(fh))
		pk, err := cl.ReadPacket(fh)
		require.NoError(t, err)
		got = append(got, pk)
	}
	for i, p := range []string{"first", "second", "third"} {
		require.Equal(t, "a/b", got[i].TopicName)
		require.Equal(t, p, string(got[i].Payload))
	}
}

// Patch 22: packets written through pooled buffers arrive whole and in
// order, queued (batched in the write buffer) or not.
func TestWriteBufferPooledBytesIntact(t *testing.T) {
	s := newServer()
	defer s.Close()
	r, w := net.Pipe()
	defer r.Close()
	cl := s.NewClient(w, "t", "sub", false)
	cl.Properties.ProtocolVersion = 4
	hook := new(countingHook)
	require.NoError(t, cl.ops.hooks.Add(hook, nil))
	const n = 300
	done := make(chan []string, 1)
	go func() {
		br := bufio.NewReader(r)
		var got []string
		for len(got) < n {
			b, err := br.ReadByte()
			if err != nil {
				break
			}
			fh := new(packets.FixedHeader)
			require.NoError(t, fh.Decode(b))
			rem, _, err := packets.DecodeLength(br)
			require.NoError(t, err)
			body := make([]byte, rem)
			_, err = io.ReadFull(br, body)
			require.NoError(t, err)
			pk := packets.Packet{FixedHeader: *fh}
			require.NoError(t, pk.PublishDecode(body))
			got = append(got, string(pk.Payload))
		}
		done <- got
	}()
	var want []string
	for i := 0; i < n; i++ {
		p := bytes.Repeat([]byte{byte('a' + i%26)}, 1+i*97%5000) // some larger than the write buffer
		want = append(want, string(p))
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a/b", Payload: p}
		require.NoError(t, cl.writePacket(pk, i%3 != 0))
	}
	require.NoError(t, cl.flushDeferred())
	select {
	case got := <-done:
		require.Equal(t, want, got)
	case <-time.After(30 * time.Second):
		t.Fatal("not everything written")
	}
	require.EqualValues(t, n, hook.sent.Load())
}

// Patch 23: the deliveries of a message share its payload; the original
// packet keeps it too.
func TestSharePayloadAcrossDeliveries(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl1, _ := queueClient(t, s, QueuePolicy{Size: 4})
	for len(cl1.State.outbound) > 0 { // queueClient fills it
		<-cl1.State.outbound
	}
	payload := []byte("reading")
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a", Payload: payload}
	out, err := s.publishToClient(cl1, packets.Subscription{Filter: "a"}, pk)
	require.NoError(t, err)
	require.Equal(t, "reading", string(out.Payload))
	require.Same(t, &payload[0], &out.Payload[0])
	require.Same(t, &payload[0], &pk.Payload[0])
	// An empty payload stays as upstream copied it (nil).
	out, err = s.publishToClient(cl1, packets.Subscription{Filter: "a"}, packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName: "a", Payload: []byte{}})
	require.NoError(t, err)
	require.Nil(t, out.Payload)
}

// Patch 24: NextImmediate finds the first message waiting for send quota,
// in GetAll's order, as the entries are set, replaced, deleted and cloned.
func TestNextImmediateCounted(t *testing.T) {
	i := NewInflights()
	_, ok := i.NextImmediate()
	require.False(t, ok)
	pub := func(id uint16, created, expiry int64) packets.Packet {
		return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id, Created: created, Expiry: expiry}
	}
	for id := uint16(1); id <= 50; id++ {
		i.Set(pub(id, 100, 0)) // in flight, not waiting
	}
	_, ok = i.NextImmediate()
	require.False(t, ok)
	i.Set(pub(60, 102, -1))
	i.Set(pub(61, 101, -1))
	i.Set(pub(59, 101, -1))
	next, ok := i.NextImmediate()
	require.True(t, ok)
	require.EqualValues(t, 59, next.PacketID)
	require.Equal(t, i.GetAll(true)[0], next)
	require.Equal(t, 3, i.immediate)

	i.Set(pub(59, 101, 0)) // sent: no longer waiting
	next, _ = i.NextImmediate()
	require.EqualValues(t, 61, next.PacketID)
	require.True(t, i.Delete(61))
	require.False(t, i.Delete(61))
	next, _ = i.NextImmediate()
	require.EqualValues(t, 60, next.PacketID)
	c := i.Clone()
	require.Equal(t, 1, c.immediate)
	require.True(t, i.Delete(60))
	_, ok = i.NextImmediate()
	require.False(t, ok)
	require.Zero(t, i.immediate)
	next, ok = c.NextImmediate()
	require.True(t, ok)
	require.EqualValues(t, 60, next.PacketID)
}

// Patch 25: the expiry sweep deletes exactly the expired messages, in
// GetAll's order, and leaves the others.
func TestExpiredSweepOnlyExpired(t *testing.T) {
	cl, _, _ := newTestClient()
	now := time.Now().Unix()
	for id := uint16(1); id <= 40; id++ {
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, PacketID: id, Created: now, ProtocolVersion: 5}
		if id%10 == 0 {
			pk.Expiry = now - 1 // expired
			pk.Created = now - int64(id)
		}
		cl.State.Inflight.Set(pk)
	}
	require.Equal(t, []uint16{40, 30, 20, 10}, cl.ClearExpiredInflights(now, 0))
	require.Equal(t, 36, cl.State.Inflight.Len())
	require.Empty(t, cl.ClearExpiredInflights(now, 0))
}

// Patch 26: queued packets are recycled once written; every delivery is
// written whole, with its own payload, in order.
func TestQueuedPacketsRecycledIntact(t *testing.T) {
	s := newServer()
	defer s.Close()
	r, w := net.Pipe()
	defer r.Close()
	cl := s.NewClient(w, "t", "sub", false)
	cl.Properties.ProtocolVersion = 4
	s.Options.ClientQueue = func(*Client) QueuePolicy { return QueuePolicy{Size: 8, WaitQos0: time.Minute} }
	s.sizeQueue(cl)
	cl.State.lazyWriter = true
	s.Clients.Add(cl)
	const n = 3000
	done := make(chan []string, 1)
	go func() {
		br := bufio.NewReader(r)
		var got []string
		for len(got) < n {
			b, err := br.ReadByte()
			if err != nil {
				break
			}
			fh := new(packets.FixedHeader)
			if fh.Decode(b) != nil {
				break
			}
			rem, _, err := packets.DecodeLength(br)
			if err != nil {
				break
			}
			body := make([]byte, rem)
			if _, err := io.ReadFull(br, body); err != nil {
				break
			}
			pk := packets.Packet{FixedHeader: *fh}
			if pk.PublishDecode(body) != nil {
				break
			}
			got = append(got, pk.TopicName+"="+string(pk.Payload))
		}
		done <- got
	}()
	var want []string
	for i := 0; i < n; i++ {
		topic, payload := "t/"+string(rune('a'+i%26)), bytes.Repeat([]byte{byte('0' + i%10)}, 1+i%300)
		want = append(want, topic+"="+string(payload))
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "#"},
			packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: payload})
		require.NoError(t, err)
	}
	select {
	case got := <-done:
		require.Equal(t, want, got)
	case <-time.After(60 * time.Second):
		t.Fatal("not every queued packet was written")
	}
}

// Patch 27: where mayExpire is false, messageExpired is false at any time,
// so delivery need not read the clock.
func TestMayExpireCoversMessageExpired(t *testing.T) {
	now := time.Now().Unix()
	for _, pv := range []byte{4, 5} {
		for _, created := range []int64{0, now - 100} {
			for _, interval := range []uint32{0, 10} {
				for _, expiry := range []int64{-1, 0, now - 50, now + 50} {
					for _, maximum := range []int64{0, 5} {
						pk := packets.Packet{ProtocolVersion: pv, Created: created, Expiry: expiry,
							Properties: packets.Properties{MessageExpiryInterval: interval}}
						if mayExpire(pk, maximum) {
							continue
						}
						for _, at := range []int64{0, now, now + 1<<32} {
							require.False(t, messageExpired(pk, maximum, at), "%+v max %d at %d", pk, maximum, at)
						}
					}
				}
			}
		}
	}
	require.True(t, mayExpire(packets.Packet{Created: now, Properties: packets.Properties{MessageExpiryInterval: 1}}, 0))
}
