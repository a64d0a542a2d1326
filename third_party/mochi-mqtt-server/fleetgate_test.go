package mqtt

// Tests of fleetgate's patches (FORK.md): the subscribers cache and the
// per-client outbound queue policy.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
)

func subscriberIDs(s *Subscribers) []string {
	var ids []string
	for id := range s.Subscriptions {
		ids = append(ids, id)
	}
	return ids
}

func TestCachedSubscribersFollowsSubscriptionChanges(t *testing.T) {
	x := NewTopicsIndex()
	require.Empty(t, x.CachedSubscribers("devices/d1/telemetry").Subscriptions)

	x.Subscribe("svc", packets.Subscription{Filter: "devices/+/telemetry/#", Qos: 1})
	require.ElementsMatch(t, []string{"svc"}, subscriberIDs(x.CachedSubscribers("devices/d1/telemetry")))
	// Served from the cache: the same object.
	require.Same(t, x.CachedSubscribers("devices/d1/telemetry"), x.CachedSubscribers("devices/d1/telemetry"))

	x.Subscribe("other", packets.Subscription{Filter: "devices/d1/#"})
	require.ElementsMatch(t, []string{"svc", "other"}, subscriberIDs(x.CachedSubscribers("devices/d1/telemetry")))
	// A changed subscription (QoS) of an existing subscriber is seen too.
	x.Subscribe("svc", packets.Subscription{Filter: "devices/+/telemetry/#", Qos: 0})
	require.Equal(t, byte(0), x.CachedSubscribers("devices/d1/telemetry").Subscriptions["svc"].Qos)

	x.Unsubscribe("devices/+/telemetry/#", "svc")
	require.ElementsMatch(t, []string{"other"}, subscriberIDs(x.CachedSubscribers("devices/d1/telemetry")))
	x.Unsubscribe("devices/d1/#", "other")
	require.Empty(t, x.CachedSubscribers("devices/d1/telemetry").Subscriptions)

	x.InlineSubscribe(InlineSubscription{Subscription: packets.Subscription{Filter: "devices/#", Identifier: 7}})
	require.Len(t, x.CachedSubscribers("devices/d1/telemetry").InlineSubscriptions, 1)
	x.InlineUnsubscribe(7, "devices/#")
	require.Empty(t, x.CachedSubscribers("devices/d1/telemetry").InlineSubscriptions)
}

func TestCachedSubscribersSharedNotCached(t *testing.T) {
	x := NewTopicsIndex()
	x.Subscribe("a", packets.Subscription{Filter: "$share/g/devices/#"})
	s1 := x.CachedSubscribers("devices/d1/telemetry")
	require.Len(t, s1.Shared, 1)
	require.NotSame(t, s1, x.CachedSubscribers("devices/d1/telemetry"), "results with shared subscriptions are mutated by the caller and must be fresh")
}

func TestCachedSubscribersBounded(t *testing.T) {
	x := NewTopicsIndex()
	x.Subscribe("svc", packets.Subscription{Filter: "#"})
	for i := 0; i < maxCachedTopics+100; i++ {
		require.Len(t, x.CachedSubscribers(fmt.Sprintf("t/%d", i)).Subscriptions, 1)
	}
	x.cache.RLock()
	n := len(x.cache.m)
	x.cache.RUnlock()
	require.LessOrEqual(t, n, maxCachedTopics)

	long := "t/" + strings.Repeat("x", maxCachedTopicLen)
	require.Len(t, x.CachedSubscribers(long).Subscriptions, 1)
	x.cache.RLock()
	_, cached := x.cache.m[long]
	x.cache.RUnlock()
	require.False(t, cached, "long topics are not cached (memory)")
}

// Subscribing while other goroutines look up: every lookup that starts
// after a Subscribe returned sees it (run with -race).
func TestCachedSubscribersConcurrent(t *testing.T) {
	x := NewTopicsIndex()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
					_ = x.CachedSubscribers("devices/d1/telemetry")
				}
			}
		}()
	}
	for i := 0; i < 200; i++ {
		id := fmt.Sprintf("c%d", i)
		x.Subscribe(id, packets.Subscription{Filter: "devices/+/telemetry"})
		_, ok := x.CachedSubscribers("devices/d1/telemetry").Subscriptions[id]
		require.True(t, ok, "subscription %s not seen after Subscribe returned", id)
		x.Unsubscribe("devices/+/telemetry", id)
		_, ok = x.CachedSubscribers("devices/d1/telemetry").Subscriptions[id]
		require.False(t, ok, "subscription %s seen after Unsubscribe returned", id)
	}
	close(stop)
	wg.Wait()
}

// queueClient is a connected client of s whose outbound queue has the given
// policy and is full; its write loop is not running, so nothing drains it
// until the test says so.
func queueClient(t *testing.T, s *Server, q QueuePolicy) (*Client, net.Conn) {
	r, w := net.Pipe()
	t.Cleanup(func() { _ = r.Close(); _ = w.Close() })
	cl := s.NewClient(w, "t", "sub", false)
	s.Options.ClientQueue = func(*Client) QueuePolicy { return q }
	s.sizeQueue(cl)
	require.Equal(t, q.Size, cap(cl.State.outbound))
	for i := 0; i < q.Size; i++ {
		cl.State.outbound <- new(packets.Packet)
	}
	s.Clients.Add(cl)
	return cl, r
}

func TestQueuePolicyQos0WaitsThenDrops(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 2, WaitQos0: 50 * time.Millisecond, WaitQos12: time.Minute})

	// Full and nothing drains it: the delivery waits, then is dropped.
	_, err := s.publishToClient(cl, packets.Subscription{Filter: "a"}, packets.Packet{TopicName: "a"})
	require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	require.EqualValues(t, 1, s.Info.MessagesDropped)

	// Its writer has taken nothing for longer than the wait: the next one is
	// dropped without waiting (else one stuck subscriber would cost every
	// publisher a wait per message). A wait of a minute would outlast the
	// deadline below.
	cl.State.queue.WaitQos0 = time.Minute
	cl.State.progress.Store(time.Now().Add(-time.Hour).UnixNano())
	done := make(chan error, 1)
	go func() {
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a"}, packets.Packet{TopicName: "a"})
		done <- err
	}()
	select {
	case err := <-done:
		require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	case <-time.After(20 * time.Second):
		t.Fatal("a delivery to a stalled subscriber waited again")
	}
	require.EqualValues(t, 2, s.Info.MessagesDropped)

	// A QoS 1 message to the same stalled subscriber is not dropped: the
	// client is disconnected and the message kept for its session.
	out, err := s.publishToClient(cl, packets.Subscription{Filter: "a", Qos: 1},
		packets.Packet{TopicName: "a", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte("keep")})
	require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	require.True(t, cl.Closed())
	_, ok := cl.State.Inflight.Get(out.PacketID)
	require.True(t, ok, "the QoS 1 message stays in the session's in-flight store")
	require.EqualValues(t, 2, s.Info.MessagesDropped)
}

func TestQueuePolicyQos0WaitsForRoom(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 2, WaitQos0: time.Hour})

	done := make(chan error, 1)
	go func() {
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a"}, packets.Packet{TopicName: "a", Payload: []byte("x")})
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("delivery to a full queue returned before room was made: %v", err)
	case <-time.After(20 * time.Millisecond):
	}
	<-cl.State.outbound // room for one
	require.NoError(t, <-done)
	require.Len(t, cl.State.outbound, 2)
	require.Zero(t, s.Info.MessagesDropped)
	last := <-cl.State.outbound
	last = <-cl.State.outbound
	require.Equal(t, []byte("x"), last.Payload, "the waiting message was queued, not lost")
}

func TestQueuePolicyQos0WaitEndsWhenClientCloses(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 1, WaitQos0: time.Hour})
	done := make(chan error, 1)
	go func() {
		_, err := s.publishToClient(cl, packets.Subscription{Filter: "a"}, packets.Packet{TopicName: "a"})
		done <- err
	}()
	time.Sleep(20 * time.Millisecond) // let it reach the wait (either way it must return)
	cl.Stop(errClientStop)
	err := <-done
	require.True(t, errors.Is(err, packets.ErrPendingClientWritesExceeded) || errors.Is(err, packets.CodeDisconnect), "%v", err)
}

func TestQueuePolicyQos1StalledClientDisconnectedMessageKept(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 1, WaitQos12: 50 * time.Millisecond})
	out, err := s.publishToClient(cl, packets.Subscription{Filter: "a", Qos: 1},
		packets.Packet{TopicName: "a", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte("keep")})
	require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	require.True(t, cl.Closed(), "a client that took nothing for WaitQos12 is disconnected")
	kept, ok := cl.State.Inflight.Get(out.PacketID)
	require.True(t, ok, "the QoS 1 message stays in the session's in-flight store")
	require.Equal(t, []byte("keep"), kept.Payload)
	require.Zero(t, s.Info.MessagesDropped)
}

func TestQueuePolicyZeroIsUpstream(t *testing.T) {
	s := newServer()
	defer s.Close()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 1})
	_, err := s.publishToClient(cl, packets.Subscription{Filter: "a", Qos: 1},
		packets.Packet{TopicName: "a", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}})
	require.ErrorIs(t, err, packets.ErrPendingClientWritesExceeded)
	require.False(t, cl.Closed())
	require.Zero(t, cl.State.Inflight.Len(), "upstream rolls the in-flight entry back")
}

// The write loop starts only once the queue is sized, so the resized queue
// is the one drained: a packet queued after attachClient sized it reaches
// the wire.
func TestQueuePolicyAppliedOnConnect(t *testing.T) {
	s := newServer()
	sized := make(chan int, 1)
	s.Options.ClientQueue = func(cl *Client) QueuePolicy {
		sized <- 1
		return QueuePolicy{Size: 7, WaitQos0: time.Second}
	}
	r, w := net.Pipe()
	cl := s.NewClient(w, "t", "", false)
	go func() {
		_, _ = r.Write(packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes)
	}()
	errs := make(chan error, 1)
	go func() { errs <- s.attachClient(cl, "t") }()
	buf := make([]byte, 4)
	_, err := r.Read(buf) // CONNACK
	require.NoError(t, err)
	require.Equal(t, byte(packets.Connack<<4), buf[0])
	<-sized
	require.Equal(t, 7, cap(cl.State.outbound))
	require.Equal(t, time.Second, cl.State.queue.WaitQos0)
	_ = r.Close()
	<-errs
	s.Close()
}

// With the lazy writer, packets queued concurrently by many publishers are
// all written, in spite of writers starting and ending as the queue
// empties and fills, and no writer goroutine is left once it is empty.
func TestLazyWriterWritesEverything(t *testing.T) {
	s := newServer()
	defer s.Close()
	r, w := net.Pipe()
	defer r.Close()
	cl := s.NewClient(w, "t", "sub", false)
	cl.Properties.ProtocolVersion = 4
	s.Options.ClientQueue = func(*Client) QueuePolicy { return QueuePolicy{Size: 4, WaitQos0: time.Minute} }
	s.sizeQueue(cl)
	cl.State.lazyWriter = true
	s.Clients.Add(cl)

	const publishers, each = 8, 500
	got := make(chan int, 1)
	go func() {
		n := 0
		br := bufio.NewReader(r)
		for n < publishers*each {
			fh := new(packets.FixedHeader)
			b, err := br.ReadByte()
			if err != nil {
				break
			}
			if err := fh.Decode(b); err != nil {
				break
			}
			rem, _, err := packets.DecodeLength(br)
			if err != nil {
				break
			}
			if _, err := io.CopyN(io.Discard, br, int64(rem)); err != nil {
				break
			}
			if fh.Type == packets.Publish {
				n++
			}
		}
		got <- n
	}()
	var wg sync.WaitGroup
	for p := 0; p < publishers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < each; i++ {
				_, err := s.publishToClient(cl, packets.Subscription{Filter: "a"},
					packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: "a", Payload: []byte("x")})
				require.NoError(t, err)
			}
		}()
	}
	wg.Wait()
	select {
	case n := <-got:
		require.Equal(t, publishers*each, n)
	case <-time.After(60 * time.Second):
		t.Fatal("not every queued packet was written (a writer was lost)")
	}
	require.Eventually(t, func() bool { return !cl.State.writing.Load() && len(cl.State.outbound) == 0 },
		10*time.Second, time.Millisecond, "a writer is left running on an empty queue")
	require.Zero(t, s.Info.MessagesDropped)
}

func publishQos1(id uint16) []byte {
	topic := "a/b"
	body := []byte{byte(len(topic) >> 8), byte(len(topic))}
	body = append(body, topic...)
	body = append(body, byte(id>>8), byte(id), 'x')
	return append([]byte{packets.Publish<<4 | 0x02, byte(len(body))}, body...)
}

// Acknowledgements deferred while more input is buffered are all written,
// and the last one before the read loop waits for input is flushed (a
// client that sends one PUBLISH and waits for its PUBACK gets it).
func TestDeferredAcksFlushedBeforeWaiting(t *testing.T) {
	s := New(&Options{Logger: logger}) // default capabilities: receive maximum 1024
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	defer s.Close()
	r, w := net.Pipe()
	defer r.Close()
	cl := s.NewClient(w, "t", "", false)
	errs := make(chan error, 1)
	go func() { errs <- s.attachClient(cl, "t") }()

	in := append([]byte{}, packets.TPacketData[packets.Connect].Get(packets.TConnectMqtt311).RawBytes...)
	for id := uint16(1); id <= 3; id++ {
		in = append(in, publishQos1(id)...)
	}
	go func() { _, _ = r.Write(in) }()
	require.NoError(t, r.SetReadDeadline(time.Now().Add(30*time.Second))) // fail, not hang
	br := bufio.NewReader(r)
	readAck := func() (byte, uint16) {
		h, err := br.ReadByte()
		require.NoError(t, err)
		n, err := br.ReadByte()
		require.NoError(t, err)
		b := make([]byte, n)
		_, err = io.ReadFull(br, b)
		require.NoError(t, err)
		if h>>4 == packets.Puback {
			return h >> 4, uint16(b[0])<<8 | uint16(b[1])
		}
		return h >> 4, 0
	}
	typ, _ := readAck()
	require.Equal(t, byte(packets.Connack), typ)
	for id := uint16(1); id <= 3; id++ {
		typ, got := readAck()
		require.Equal(t, byte(packets.Puback), typ)
		require.Equal(t, id, got)
	}
	// One more PUBLISH on its own: its PUBACK must come without further input.
	go func() { _, _ = r.Write(publishQos1(4)) }()
	typ, got := readAck()
	require.Equal(t, byte(packets.Puback), typ)
	require.Equal(t, uint16(4), got)
	// A QoS 1 PUBLISH followed by a QoS 0 one (no acknowledgement of its
	// own) and the first half of another: the deferred PUBACK is flushed
	// before the read loop waits for the rest.
	qos0 := publishQos1(0)
	qos0[0] = packets.Publish << 4
	qos0 = append(qos0[:len(qos0)-3], 'x') // no packet ID at QoS 0
	qos0[1] = byte(len(qos0) - 2)
	half := publishQos1(6)[:4]
	go func() { _, _ = r.Write(append(append(publishQos1(5), qos0...), half...)) }()
	typ, got = readAck()
	require.Equal(t, byte(packets.Puback), typ)
	require.Equal(t, uint16(5), got)
	_ = r.Close()
	<-errs
}

// A SUBSCRIBE whose packet ID equals that of a QoS 1 message the server is
// delivering to the client is accepted: the two sides assign IDs
// independently (MQTT 5 §2.2.1).
func TestSubscribeIDIndependentOfServerDeliveries(t *testing.T) {
	s := newServer()
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.Set(packets.Packet{PacketID: 15, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}})
	pkx := *packets.TPacketData[packets.Subscribe].Get(packets.TSubscribeMqtt5).Packet
	pkx.PacketID = 15
	go func() {
		err := s.processPacket(cl, pkx)
		require.NoError(t, err)
		_ = w.Close()
	}()
	buf, err := io.ReadAll(r)
	require.NoError(t, err)
	require.NotEqual(t, packets.TPacketData[packets.Suback].Get(packets.TSubackPacketIDInUse).RawBytes, buf)
	require.Equal(t, byte(packets.Suback<<4), buf[0])
	require.NotContains(t, buf[2:], byte(packets.ErrPacketIdentifierInUse.Code), "refused as in use")
}

// On session resume the server resends its own unacknowledged PUBLISH (with
// DUP) but not an acknowledgement of the client's publish: that one could
// complete a new message the client sent with the same packet ID.
func TestResumeResendsPublishNotAcks(t *testing.T) {
	cl, r, w := newTestClient()
	cl.State.Inflight.Set(packets.Packet{PacketID: 3, FixedHeader: packets.FixedHeader{Type: packets.Puback}})
	cl.State.Inflight.Set(packets.Packet{PacketID: 4, FixedHeader: packets.FixedHeader{Type: packets.Pubrec}})
	cl.State.Inflight.Set(packets.Packet{PacketID: 5, TopicName: "a", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte("x")})
	go func() {
		require.NoError(t, cl.ResendInflightMessages(true))
		_ = w.Close()
	}()
	buf, err := io.ReadAll(r)
	require.NoError(t, err)
	require.NotEmpty(t, buf)
	require.Equal(t, byte(packets.Publish<<4|0x08|0x02), buf[0], "only the PUBLISH, with DUP")
	require.Len(t, buf, 2+int(buf[1]), "one packet")
	_, ok := cl.State.Inflight.Get(3)
	require.False(t, ok, "the stray PUBACK is dropped from the session")
	_, ok = cl.State.Inflight.Get(4)
	require.True(t, ok, "the client's QoS 2 exchange (PUBREC sent) is kept to detect its duplicate")
}

// A QoS 1 publish from the client whose packet ID equals that of a pending
// delivery to the client leaves that delivery in the in-flight store (it
// is resent if the connection drops before the client acknowledges it).
func TestClientQos1PublishKeepsPendingDeliveryWithSameID(t *testing.T) {
	s := New(&Options{Logger: logger}) // default capabilities: receive maximum 1024
	require.NoError(t, s.AddHook(new(AllowHook), nil))
	cl, r, w := newTestClient()
	cl.State.Inflight.ResetReceiveQuota(10)
	s.Clients.Add(cl)
	pending := packets.Packet{PacketID: 7, TopicName: "devices/d/commands/x", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte("cmd")}
	cl.State.Inflight.Set(pending)
	go func() {
		err := s.processPacket(cl, packets.Packet{PacketID: 7, TopicName: "devices/d/telemetry", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte("t")})
		require.NoError(t, err)
		_ = w.Close()
	}()
	buf, err := io.ReadAll(r)
	require.NoError(t, err)
	require.Equal(t, []byte{packets.Puback << 4, 2, 0, 7}, buf, "the publish is acknowledged")
	got, ok := cl.State.Inflight.Get(7)
	require.True(t, ok, "the pending delivery with the same ID is still in flight")
	require.Equal(t, []byte("cmd"), got.Payload)
}

// An offline session holds at most QueuePolicy.MaxOffline QoS 1/2
// messages: the next one is not stored for it, and is reported; an online
// client with the same policy is not limited by it, and a session restored
// from the store gets its policy from Options.ClientQueue.
func TestOfflineQuotaBoundsOfflineSession(t *testing.T) {
	s := newServer()
	defer s.Close()
	var dropped []string
	s.Options.OfflineQuotaDropped = func(cl *Client, pk packets.Packet) { dropped = append(dropped, cl.ID+":"+string(pk.Payload)) }
	pol := QueuePolicy{Size: 16, WaitQos12: time.Minute, MaxOffline: 2}
	off, _ := queueClient(t, s, pol)
	for len(off.State.outbound) > 0 { // queueClient fills it
		<-off.State.outbound
	}
	off.Stop(packets.ErrServerShuttingDown) // offline
	sub := packets.Subscription{Filter: "a", Qos: 1}
	msg := func(p string) packets.Packet {
		return packets.Packet{TopicName: "a", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte(p)}
	}
	for _, p := range []string{"1", "2"} {
		_, err := s.publishToClient(off, sub, msg(p))
		require.ErrorIs(t, err, packets.CodeDisconnect, "stored for the offline session")
	}
	_, err := s.publishToClient(off, sub, msg("3"))
	require.ErrorIs(t, err, packets.ErrQuotaExceeded)
	require.Equal(t, 2, off.State.Inflight.Len())
	require.Equal(t, []string{"sub:3"}, dropped)
	require.EqualValues(t, 1, s.Info.InflightDropped)

	// Online, the same policy bounds nothing but the outbound queue.
	on := s.NewClient(nil, "t", "on", false)
	on.State.queue = pol
	on.Net.Conn, _ = net.Pipe()
	for _, p := range []string{"1", "2", "3"} {
		_, err := s.publishToClient(on, sub, msg(p))
		require.NoError(t, err)
	}
	require.Equal(t, 3, on.State.Inflight.Len())
	require.Len(t, dropped, 1)

	// A restored session is offline from the start and has its quota.
	s.loadClients([]storage.Client{{ID: "restored", ProtocolVersion: 4}})
	restored, ok := s.Clients.Get("restored")
	require.True(t, ok)
	require.Equal(t, 2, restored.State.queue.MaxOffline)
}

// retainRecorder records the store's view of retained messages.
type retainRecorder struct {
	HookBase
	mu      sync.Mutex
	deleted []string
	served  []string
}

func (h *retainRecorder) ID() string { return "retain-recorder" }
func (h *retainRecorder) Provides(b byte) bool {
	return b == OnRetainMessage || b == OnRetainPublished
}
func (h *retainRecorder) OnRetainPublished(cl *Client, pk packets.Packet) {
	h.mu.Lock()
	h.served = append(h.served, pk.TopicName)
	h.mu.Unlock()
}
func (h *retainRecorder) OnRetainMessage(cl *Client, pk packets.Packet, r int64) {
	if r == -1 {
		h.mu.Lock()
		h.deleted = append(h.deleted, pk.TopicName)
		h.mu.Unlock()
	}
}

// A message an inline client publishes on behalf of another keeps that
// origin (fleetgate fans QoS 1/2 messages out through one), so its retained
// copy names the real publisher; without an origin it is the inline
// client's own.
func TestInlineOriginKept(t *testing.T) {
	s := newServerWithInlineClient()
	defer s.Close()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1, Retain: true}, TopicName: "devices/d1/state",
		Payload: []byte("on"), Origin: "d1", PacketID: 1}
	require.NoError(t, s.InjectPacket(s.inlineClient, pk))
	got, ok := s.Topics.Retained.Get("devices/d1/state")
	require.True(t, ok)
	require.Equal(t, "d1", got.Origin)

	pk.Origin, pk.TopicName = "", "devices/d2/state"
	require.NoError(t, s.InjectPacket(s.inlineClient, pk))
	got, _ = s.Topics.Retained.Get("devices/d2/state")
	require.Equal(t, InlineClientId, got.Origin)
}

// ClearRetained deletes the matching retained messages from the index and
// (through the hooks) the store, and leaves the others; ServeRetained
// withholds retained messages from a new subscriber without deleting them.
func TestClearRetainedAndServeRetained(t *testing.T) {
	s := newServer()
	defer s.Close()
	rec := new(retainRecorder)
	require.NoError(t, s.AddHook(rec, nil))
	for _, o := range []string{"d1", "d2", "d3"} {
		s.Topics.RetainMessage(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true},
			TopicName: "devices/" + o + "/state", Payload: []byte("on"), Origin: o})
	}
	n := s.ClearRetained(func(pk packets.Packet) bool { return pk.Origin == "d1" })
	require.Equal(t, 1, n)
	require.Equal(t, []string{"devices/d1/state"}, rec.deleted)
	_, ok := s.Topics.Retained.Get("devices/d1/state")
	require.False(t, ok)
	require.Len(t, s.Topics.Messages("devices/+/state"), 2)
	require.EqualValues(t, 2, s.Info.Retained)

	s.Options.ServeRetained = func(_ *Client, pk packets.Packet) bool { return pk.Origin != "d2" }
	cl, _ := queueClient(t, s, QueuePolicy{Size: 4})
	for len(cl.State.outbound) > 0 { // queueClient fills it
		<-cl.State.outbound
	}
	s.publishRetainedToClient(cl, packets.Subscription{Filter: "devices/+/state"}, false)
	rec.mu.Lock()
	require.Equal(t, []string{"devices/d3/state"}, rec.served, "d2's is withheld")
	rec.mu.Unlock()
	_, ok = s.Topics.Retained.Get("devices/d2/state")
	require.True(t, ok, "withheld, not deleted")
}

// decodePublishes decodes the PUBLISH packets (each shorter than 128
// bytes) an MQTT 5 client was sent.
func decodePublishes(t *testing.T, buf []byte) []packets.Packet {
	t.Helper()
	var out []packets.Packet
	for len(buf) > 0 {
		require.GreaterOrEqual(t, len(buf), 2)
		pk := packets.Packet{ProtocolVersion: 5}
		require.NoError(t, pk.FixedHeader.Decode(buf[0]))
		n := int(buf[1])
		require.Less(t, n, 128)
		pk.FixedHeader.Remaining = n
		require.NoError(t, pk.PublishDecode(buf[2:2+n]))
		out = append(out, pk)
		buf = buf[2+n:]
	}
	return out
}

func expiring(id uint16, topic string, age int64, interval uint32) packets.Packet {
	return packets.Packet{PacketID: id, TopicName: topic, Payload: []byte("x"),
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		Created:     time.Now().Unix() - age, Properties: packets.Properties{MessageExpiryInterval: interval},
		ProtocolVersion: 4} // as fanned out through fleetgate's inline client, or restored from the store
}

// A session resumed after some of its queued messages expired is not sent
// those [MQTT-3.3.2-5] (upstream resent them with an interval of 1, as it
// applied expiry only to packets marked MQTT 5), and the others carry the
// interval less the time they waited [MQTT-3.3.2-6].
func TestMsgExpiryNotResentDecremented(t *testing.T) {
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetSendQuota(5)
	cl.State.Inflight.Set(expiring(1, "gone", 10, 5))
	cl.State.Inflight.Set(expiring(2, "kept", 10, 60))
	cl.State.Inflight.DecreaseSendQuota()
	cl.State.Inflight.DecreaseSendQuota()
	go func() {
		require.NoError(t, cl.ResendInflightMessages(true))
		_ = w.Close()
	}()
	buf, err := io.ReadAll(r)
	require.NoError(t, err)
	got := decodePublishes(t, buf)
	require.Len(t, got, 1)
	require.Equal(t, "kept", got[0].TopicName)
	require.InDelta(t, 50, got[0].Properties.MessageExpiryInterval, 1, "60 less the 10 s it waited")
	_, ok := cl.State.Inflight.Get(1)
	require.False(t, ok, "the expired message left the session")
	require.EqualValues(t, 4, cl.State.Inflight.sendQuota, "and returned its send quota")
}

// Expired messages are neither delivered (a retained one before the sweep)
// nor kept by the sweeps, whatever protocol version their packet carries
// and also while waiting for send quota (Expiry -1); without an interval a
// message does not expire when the server sets no maximum.
func TestMsgExpirySweepsAndDelivery(t *testing.T) {
	s := newServer()
	defer s.Close()
	now := time.Now().Unix()
	cl, _ := queueClient(t, s, QueuePolicy{Size: 4})
	for len(cl.State.outbound) > 0 {
		<-cl.State.outbound
	}
	_, err := s.publishToClient(cl, packets.Subscription{Filter: "#", Qos: 1}, expiring(0, "old", 10, 5))
	require.ErrorIs(t, err, ErrMessageExpired)
	require.Zero(t, cl.State.Inflight.Len())

	s.Topics.RetainMessage(expiring(0, "r/old", 10, 5))
	s.Topics.RetainMessage(expiring(0, "r/new", 10, 60))
	s.Topics.RetainMessage(expiring(0, "r/none", 1e6, 0))
	s.clearExpiredRetainedMessages(now)
	_, ok := s.Topics.Retained.Get("r/old")
	require.False(t, ok)
	require.Len(t, s.Topics.Retained.GetAll(), 2)

	pending := expiring(3, "p", 10, 5)
	pending.Expiry = -1
	cl.State.Inflight.Set(pending)
	cl.State.Inflight.Set(expiring(4, "q", 10, 60))
	cl.State.Inflight.Set(expiring(5, "n", 1e6, 0))
	require.ElementsMatch(t, []uint16{3}, cl.ClearExpiredInflights(now, 0))
}

// A resumed session's queued messages are resent in the order they were
// stored, also those stored within one second.
func TestResumeResendsInOrder(t *testing.T) {
	cl, r, w := newTestClient()
	cl.Properties.ProtocolVersion = 5
	now := time.Now().Unix()
	const n = 40
	for i := n; i >= 1; i-- { // the map's order is not the IDs'
		cl.State.Inflight.Set(packets.Packet{PacketID: uint16(i), TopicName: fmt.Sprintf("t/%02d", i), Payload: []byte("x"),
			FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Created: now})
	}
	cl.State.Inflight.Set(packets.Packet{PacketID: 100, TopicName: "t/earlier", Payload: []byte("x"),
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Created: now - 70000}) // 70,000 s: more than uint16
	go func() {
		require.NoError(t, cl.ResendInflightMessages(true))
		_ = w.Close()
	}()
	buf, err := io.ReadAll(r)
	require.NoError(t, err)
	got := decodePublishes(t, buf)
	require.Len(t, got, n+1)
	require.Equal(t, "t/earlier", got[0].TopicName)
	for i := 1; i <= n; i++ {
		require.Equal(t, fmt.Sprintf("t/%02d", i), got[i].TopicName)
	}
}

// topicACLHook allows publishing only under ok/ and records every topic
// the ACL check saw.
type topicACLHook struct {
	HookBase
	mu   sync.Mutex
	seen []string
}

func (h *topicACLHook) ID() string { return "topic-acl" }
func (h *topicACLHook) Provides(b byte) bool {
	return b == OnACLCheck || b == OnConnectAuthenticate
}
func (h *topicACLHook) OnConnectAuthenticate(*Client, packets.Packet) bool { return true }
func (h *topicACLHook) OnACLCheck(_ *Client, topic string, write bool) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.seen = append(h.seen, topic)
	return !write || strings.HasPrefix(topic, "ok/")
}

func aliasPublish(topic string, alias uint16) packets.Packet {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: []byte("p"), ProtocolVersion: 5}
	pk.Properties.TopicAlias, pk.Properties.TopicAliasFlag = alias, true
	return pk
}

// A topic alias is resolved before the ACL check (which sees the real
// topic, never the empty one of an alias-only publish); re-setting an alias
// to a forbidden topic and using it alias-only is checked on that topic;
// invalid aliases (0, above the maximum, never set) are refused with 0x94;
// at most TopicAliasMaximum aliases are kept.
func TestAliasResolvedBeforeTheACLCheck(t *testing.T) {
	caps := NewDefaultServerCapabilities()
	caps.TopicAliasMaximum = 4
	s := New(&Options{Logger: logger, Capabilities: caps})
	h := new(topicACLHook)
	require.NoError(t, s.AddHook(h, nil))
	_, w := net.Pipe()
	defer w.Close()
	cl := s.NewClient(w, "t", "alias", false)
	cl.Properties.ProtocolVersion = 5
	cl.State.Inflight.ResetReceiveQuota(10)
	s.Clients.Add(cl)

	require.NoError(t, s.processPacket(cl, aliasPublish("ok/a", 1)))
	require.NoError(t, s.processPacket(cl, aliasPublish("", 1)))
	require.NoError(t, s.processPacket(cl, aliasPublish("ok/b", 2)))
	require.NoError(t, s.processPacket(cl, aliasPublish("secret/x", 2))) // refused by the ACL (QoS 0: dropped)
	require.NoError(t, s.processPacket(cl, aliasPublish("", 2)))
	require.Equal(t, []string{"ok/a", "ok/a", "ok/b", "secret/x", "secret/x"}, h.seen)

	for _, pk := range []packets.Packet{aliasPublish("ok/a", 0), aliasPublish("ok/a", 5), aliasPublish("ok/a", 65535), aliasPublish("", 3)} {
		require.ErrorIs(t, s.processPacket(cl, pk), packets.ErrTopicAliasInvalid, "alias %d topic %q", pk.Properties.TopicAlias, pk.TopicName)
	}
	for i := uint16(1); i <= 4; i++ {
		require.NoError(t, s.processPacket(cl, aliasPublish(fmt.Sprintf("ok/%d", i), i)))
	}
	require.Len(t, cl.State.TopicAliases.Inbound.internal, 4)
}

// With AnnounceLimits, an MQTT 5 CONNACK carries Topic Alias Maximum and
// Maximum Packet Size; without it (upstream), neither.
func TestLimitsAnnouncedInConnack(t *testing.T) {
	for _, announce := range []bool{true, false} {
		caps := NewDefaultServerCapabilities()
		caps.TopicAliasMaximum, caps.MaximumPacketSize, caps.AnnounceLimits = 16, 1<<18, announce
		s := New(&Options{Logger: logger, Capabilities: caps})
		r, w := net.Pipe()
		cl := s.NewClient(w, "t", "ack", false)
		cl.Properties.ProtocolVersion = 5
		go func() {
			_ = s.SendConnack(cl, packets.CodeSuccess, false, nil)
			_ = w.Close()
		}()
		buf, err := io.ReadAll(r)
		require.NoError(t, err)
		require.Greater(t, len(buf), 2)
		pk := packets.Packet{ProtocolVersion: 5}
		require.NoError(t, pk.FixedHeader.Decode(buf[0]))
		require.NoError(t, pk.ConnackDecode(buf[2:]))
		if announce {
			require.Equal(t, uint16(16), pk.Properties.TopicAliasMaximum)
			require.Equal(t, uint32(1<<18), pk.Properties.MaximumPacketSize)
		} else {
			require.Zero(t, pk.Properties.TopicAliasMaximum)
			require.Zero(t, pk.Properties.MaximumPacketSize)
		}
	}
}

// willGate is an OnWill hook that drops every will while closed, and
// records the order of OnWill, OnWillSent and OnClientExpired calls.
type willGate struct {
	HookBase
	mu     sync.Mutex
	open   bool
	events []string
}

func (h *willGate) ID() string { return "will-gate" }
func (h *willGate) Provides(b byte) bool {
	return b == OnWill || b == OnWillSent || b == OnClientExpired
}
func (h *willGate) OnWillSent(cl *Client, _ packets.Packet) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "sent "+cl.ID)
}
func (h *willGate) OnWill(cl *Client, will Will) (Will, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "will "+cl.ID)
	if !h.open {
		return Will{}, nil
	}
	return will, nil
}
func (h *willGate) OnClientExpired(cl *Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.events = append(h.events, "expired "+cl.ID)
}
func (h *willGate) setOpen(v bool) { h.mu.Lock(); h.open = v; h.mu.Unlock() }
func (h *willGate) log() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.events...)
}

// willServer is a server with a willGate.
func willServer(t *testing.T) (*Server, *willGate) {
	s := newServer()
	g := new(willGate)
	require.NoError(t, s.AddHook(g, nil))
	return s, g
}

func delayedWillClient(s *Server, id string, delay uint32) *Client {
	cl, _, _ := newTestClient()
	cl.ID = id
	cl.Properties.Will = Will{Flag: 1, TopicName: "w/" + id, Payload: []byte("will"), WillDelayInterval: delay}
	s.Clients.Add(cl)
	return cl
}

// A delayed will goes through the OnWill hooks when it is due, not when
// the connection ends: a hook that refuses it by then drops it, one that
// allows it by then lets it be published.
func TestDelayedWillHooksRunWhenDue(t *testing.T) {
	s, g := willServer(t)
	denied := delayedWillClient(s, "denied", 5)
	s.sendLWT(denied)
	require.Empty(t, g.log(), "no hook at disconnect for a delayed will")
	s.sendDelayedLWT(time.Now().Unix() + 10) // due, gate closed
	require.Equal(t, []string{"will denied"}, g.log(), "checked when due, not sent")
	require.Equal(t, 0, s.loop.willDelayed.Len())
	require.Equal(t, uint32(0), atomic.LoadUint32(&denied.Properties.Will.Flag))

	g.setOpen(true)
	allowed := delayedWillClient(s, "allowed", 5)
	s.sendLWT(allowed)
	s.sendDelayedLWT(time.Now().Unix() + 10)
	require.Equal(t, []string{"will denied", "will allowed", "sent allowed"}, g.log())
	require.Equal(t, Will{}, allowed.Properties.Will, "sent [MQTT-3.1.2-10]")
}

// A delayed will is not sent if its session was taken by a new connection
// meanwhile, also when the old connection's end is processed after the new
// CONNECT (the will is scheduled after the new connection cancelled it).
func TestDelayedWillNotSentAfterANewConnectionTookTheSession(t *testing.T) {
	s, g := willServer(t)
	g.setOpen(true)
	old := delayedWillClient(s, "dev", 5)
	delayedWillClient(s, "dev", 5) // the new connection holds the ID
	s.sendLWT(old)                 // the old connection's end, processed late
	s.sendDelayedLWT(time.Now().Unix() + 10)
	require.Empty(t, g.log(), "the old connection's will was not considered")
	require.Equal(t, 0, s.loop.willDelayed.Len())
	_, ok := s.loop.willOwner.Load("dev")
	require.False(t, ok, "no reference to the old client kept")
}

// A session that expires before its will delay ends sends its will first,
// before the expiry hooks forget the session.
func TestDelayedWillSentAtSessionExpiry(t *testing.T) {
	s, g := willServer(t)
	g.setOpen(true)
	cl := delayedWillClient(s, "exp", 3600)
	cl.Properties.ProtocolVersion = 5
	cl.Properties.Props.SessionExpiryInterval, cl.Properties.Props.SessionExpiryIntervalFlag = 1, true
	cl.Stop(errors.New("gone"))
	s.sendLWT(cl)
	s.clearExpiredClients(time.Now().Unix() + 10)
	require.Equal(t, []string{"will exp", "sent exp", "expired exp"}, g.log())
	require.Equal(t, 0, s.loop.willDelayed.Len())
}

// handoverSession makes an offline persistent session "dev" subscribed to
// cmd/# at QoS 1, in s.Clients.
func handoverSession(s *Server) (*Client, packets.Subscription) {
	sub := packets.Subscription{Filter: "cmd/#", Qos: 1}
	old := s.NewClient(nil, "t", "dev", false)
	old.Properties.ProtocolVersion = 4
	old.State.Subscriptions.Add(sub.Filter, sub)
	s.Topics.Subscribe(old.ID, sub)
	s.Clients.Add(old)
	return old, sub
}

func handoverCommand(p string) packets.Packet {
	return packets.Packet{TopicName: "cmd/x", FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, Payload: []byte(p), Created: time.Now().Unix()}
}

func resumeConnect(id string) packets.Packet {
	return packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4, Connect: packets.ConnectParams{ClientIdentifier: id}}
}

func inflightPayloads(cl *Client) map[string]bool {
	m := map[string]bool{}
	for _, pk := range cl.State.Inflight.GetAll(false) {
		m[string(pk.Payload)] = true
	}
	return m
}

// A delivery that looked up the old client of a session before a new
// connection inherited it, and stores the message after the inheritance,
// stores it in the new client's session (upstream stored it in the old
// client's in-flight map, cloned already: the message was acknowledged to
// its publisher and never delivered).
func TestSessionHandoverRedirectsLateDelivery(t *testing.T) {
	s := newServer()
	defer s.Close()
	old, sub := handoverSession(s)
	_, err := s.publishToClient(old, sub, handoverCommand("before"))
	require.ErrorIs(t, err, packets.CodeDisconnect, "stored for the offline session")

	cl := s.NewClient(nil, "t", "dev", false)
	cl.Properties.ProtocolVersion = 4
	require.True(t, s.takeOverSession(resumeConnect("dev"), cl, true))
	got, ok := s.Clients.Get("dev")
	require.True(t, ok)
	require.Same(t, cl, got, "the new client holds the ID once the session is inherited")

	// The late delivery, as publishToSubscribers makes it with the client
	// it looked up before the takeover.
	_, err = s.publishToClient(old, sub, handoverCommand("late"))
	require.ErrorIs(t, err, packets.CodeDisconnect, "stored for the (offline) new client")
	require.Equal(t, map[string]bool{"before": true, "late": true}, inflightPayloads(cl))
	require.Zero(t, old.State.Inflight.Len())

	// A session taken over by a clean start is discarded: a late delivery
	// to it goes nowhere.
	fresh := s.NewClient(nil, "t", "dev", false)
	fresh.Properties.ProtocolVersion = 4
	clean := resumeConnect("dev")
	clean.Connect.Clean = true
	require.False(t, s.takeOverSession(clean, fresh, true))
	_, err = s.publishToClient(cl, sub, handoverCommand("discarded"))
	require.ErrorIs(t, err, ErrSessionTakenOver)
	require.Zero(t, fresh.State.Inflight.Len())
}

// QoS 1 messages published while a persistent session is taken over again
// and again all end up in the session of the last client (upstream lost
// those stored in a client being taken over after its in-flight map was
// cloned). Bounded: 60 takeovers against 600 messages.
func TestSessionHandoverConcurrentDeliveries(t *testing.T) {
	s := newServer()
	defer s.Close()
	handoverSession(s)
	const msgs, takeovers = 600, 60
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < msgs; i++ {
			s.publishToSubscribers(handoverCommand(fmt.Sprint(i)))
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < takeovers; i++ {
			cl := s.NewClient(nil, "t", "dev", false)
			cl.Properties.ProtocolVersion = 4
			s.takeOverSession(resumeConnect("dev"), cl, true)
			time.Sleep(50 * time.Microsecond) // let deliveries reach each client
		}
	}()
	wg.Wait()
	last, ok := s.Clients.Get("dev")
	require.True(t, ok)
	got := inflightPayloads(last)
	var missing []int
	for i := 0; i < msgs; i++ {
		if !got[fmt.Sprint(i)] {
			missing = append(missing, i)
		}
	}
	require.Empty(t, missing, "messages lost in a takeover")
}

// refuseHook refuses every CONNECT with its code (patch 17).
type refuseHook struct {
	HookBase
	code packets.Code
}

func (h *refuseHook) ID() string           { return "refuse" }
func (h *refuseHook) Provides(b byte) bool { return b == OnConnectAuthenticate }
func (h *refuseHook) OnConnectAuthenticate(cl *Client, _ packets.Packet) bool {
	cl.RefuseConnect(h.code)
	return false
}

// A hook that refuses a CONNECT names the CONNACK reason: as is for MQTT
// 5, mapped to a 3.1.1 return code for 3.1.1; without a name the refusal
// stays upstream's "bad username or password".
func TestHookNamesConnectRefusal(t *testing.T) {
	for _, c := range []struct {
		code    packets.Code
		version byte
		want    byte
	}{
		{packets.ErrClientIdentifierNotValid, 5, 0x85},
		{packets.ErrNotAuthorized, 5, 0x87},
		{packets.ErrBanned, 5, 0x8A},
		{packets.Code{}, 5, 0x86},
		{packets.ErrClientIdentifierNotValid, 4, 0x02},
		{packets.ErrNotAuthorized, 4, 0x05},
		{packets.ErrBanned, 4, 0x05},
		{packets.ErrBadUsernameOrPassword, 4, 0x05},
	} {
		s := New(&Options{Logger: logger})
		require.NoError(t, s.AddHook(&refuseHook{code: c.code}, nil))
		r, w := net.Pipe()
		o := make(chan error, 1)
		go func() { o <- s.EstablishConnection("tcp", r) }()
		pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: c.version,
			Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30, ClientIdentifier: "c"}}
		var buf bytes.Buffer
		require.NoError(t, pk.ConnectEncode(&buf))
		go func() { _, _ = w.Write(buf.Bytes()) }()
		rd := bufio.NewReader(w)
		hb, err := rd.ReadByte()
		require.NoError(t, err)
		ack := packets.Packet{ProtocolVersion: c.version}
		require.NoError(t, ack.FixedHeader.Decode(hb))
		n, err := rd.ReadByte() // remaining length < 128 here
		require.NoError(t, err)
		body := make([]byte, n)
		_, err = io.ReadFull(rd, body)
		require.NoError(t, err)
		require.NoError(t, ack.ConnackDecode(body))
		require.Equal(t, c.want, ack.ReasonCode, "code %v, MQTT version %d", c.code, c.version)
		_ = w.Close()
		require.Error(t, <-o)
		_ = r.Close()
		s.Close()
	}
}
