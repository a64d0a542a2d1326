// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: 2023 mochi-mqtt, mochi-co
// SPDX-FileContributor: mochi-co

package mqtt

import (
	"sort"
	"sync"
	"sync/atomic"

	"github.com/mochi-mqtt/server/v2/packets"
)

// Inflight is a map of InflightMessage keyed on packet id.
type Inflight struct {
	sync.RWMutex
	internal            map[uint16]packets.Packet // internal contains the inflight packets
	receiveQuota        int32                     // remaining inbound qos quota for flow control
	sendQuota           int32                     // remaining outbound qos quota for flow control
	maximumReceiveQuota int32                     // maximum allowed receive quota
	maximumSendQuota    int32                     // maximum allowed send quota
	immediate           int                       // fleetgate patch 24: entries with Expiry < 0 (waiting for send quota)
}

// NewInflights returns a new instance of an Inflight packets map.
func NewInflights() *Inflight {
	return &Inflight{
		internal: map[uint16]packets.Packet{},
	}
}

// Set adds or updates an inflight packet by packet id.
func (i *Inflight) Set(m packets.Packet) bool {
	i.Lock()
	defer i.Unlock()

	old, ok := i.internal[m.PacketID]
	i.internal[m.PacketID] = m
	i.countImmediate(old, ok, -1)
	i.countImmediate(m, true, 1)
	return !ok
}

// countImmediate adds d to the count of entries waiting for send quota if
// pk (present: ok) is one (fleetgate patch 24). Under the write lock.
func (i *Inflight) countImmediate(pk packets.Packet, ok bool, d int) {
	if ok && pk.Expiry < 0 {
		i.immediate += d
	}
}

// Get returns an inflight packet by packet id.
func (i *Inflight) Get(id uint16) (packets.Packet, bool) {
	i.RLock()
	defer i.RUnlock()

	if m, ok := i.internal[id]; ok {
		return m, true
	}

	return packets.Packet{}, false
}

// Len returns the size of the inflight messages map.
func (i *Inflight) Len() int {
	i.RLock()
	defer i.RUnlock()
	return len(i.internal)
}

// Clone returns a new instance of Inflight with the same message data.
// This is used when transferring inflights from a taken-over session.
func (i *Inflight) Clone() *Inflight {
	c := NewInflights()
	i.RLock()
	defer i.RUnlock()
	for k, v := range i.internal {
		c.internal[k] = v
	}
	c.immediate = i.immediate // fleetgate patch 24
	return c
}

// GetAll returns all the inflight messages.
func (i *Inflight) GetAll(immediate bool) []packets.Packet {
	return i.getAllWhere(func(v packets.Packet) bool { return !immediate || (immediate && v.Expiry < 0) })
}

// getAllWhere returns the in-flight messages for which keep is true, in
// GetAll's order (fleetgate patch 25: GetAll's filter, given by the caller).
func (i *Inflight) getAllWhere(keep func(packets.Packet) bool) []packets.Packet {
	i.RLock()
	defer i.RUnlock()

	m := []packets.Packet{}
	for _, v := range i.internal {
		if keep(v) {
			m = append(m, v)
		}
	}

	// fleetgate patch: in the order the messages were stored — by creation,
	// then packet ID (assigned in order) — so a resumed session gets its
	// queued messages in order [MQTT-4.6.0-1]. Upstream compared the low 16
	// bits of the creation second only: messages of one second came in map
	// order, and the order broke every 18 hours.
	sort.Slice(m, func(i, j int) bool {
		if m[i].Created != m[j].Created {
			return m[i].Created < m[j].Created
		}
		return m[i].PacketID < m[j].PacketID
	})

	return m
}

// NextImmediate returns the next inflight packet which is indicated to be sent immediately.
// This typically occurs when the quota has been exhausted, and we need to wait until new quota
// is free to continue sending.
func (i *Inflight) NextImmediate() (packets.Packet, bool) {
	i.RLock()
	defer i.RUnlock()

	// fleetgate patch 24: upstream copied and sorted every in-flight
	// message (GetAll) to find this one, after every packet of a client
	// with messages in flight and send quota left: O(n log n) per PUBACK of
	// a subscriber with n messages in flight, almost always to find none.
	// Now a count says whether there is one, and one pass finds the first
	// in GetAll's order (by creation, then packet ID). (It also took the
	// read lock twice, which deadlocks with a writer waiting between.)
	var next packets.Packet
	if i.immediate == 0 {
		return next, false
	}
	found := false
	for _, v := range i.internal {
		if v.Expiry < 0 && (!found || v.Created < next.Created || (v.Created == next.Created && v.PacketID < next.PacketID)) {
			next, found = v, true
		}
	}

	return next, found
}

// Delete removes an in-flight message from the map. Returns true if the message existed.
func (i *Inflight) Delete(id uint16) bool {
	i.Lock()
	defer i.Unlock()

	old, ok := i.internal[id]
	delete(i.internal, id)
	i.countImmediate(old, ok, -1)

	return ok
}

// TakeRecieveQuota reduces the receive quota by 1.
func (i *Inflight) DecreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) > 0 {
		atomic.AddInt32(&i.receiveQuota, -1)
	}
}

// TakeRecieveQuota increases the receive quota by 1.
func (i *Inflight) IncreaseReceiveQuota() {
	if atomic.LoadInt32(&i.receiveQuota) < atomic.LoadInt32(&i.maximumReceiveQuota) {
		atomic.AddInt32(&i.receiveQuota, 1)
	}
}

// ResetReceiveQuota resets the receive quota to the maximum allowed value.
func (i *Inflight) ResetReceiveQuota(n int32) {
	atomic.StoreInt32(&i.receiveQuota, n)
	atomic.StoreInt32(&i.maximumReceiveQuota, n)
}

// DecreaseSendQuota reduces the send quota by 1.
func (i *Inflight) DecreaseSendQuota() {
	if atomic.LoadInt32(&i.sendQuota) > 0 {
		atomic.AddInt32(&i.sendQuota, -1)
	}
}

// IncreaseSendQuota increases the send quota by 1.
func (i *Inflight) IncreaseSendQuota() {
	if atomic.LoadInt32(&i.sendQuota) < atomic.LoadInt32(&i.maximumSendQuota) {
		atomic.AddInt32(&i.sendQuota, 1)
	}
}

// ResetSendQuota resets the send quota to the maximum allowed value.
func (i *Inflight) ResetSendQuota(n int32) {
	atomic.StoreInt32(&i.sendQuota, n)
	atomic.StoreInt32(&i.maximumSendQuota, n)
}
