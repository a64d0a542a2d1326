package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"strings"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
)

// Retained messages across nodes live in the KV bucket fg_retained, one
// key per topic. A node that accepts a retained publish writes (or, for an
// empty payload, deletes) the key before the publish is acknowledged;
// every node sets or clears its local retained store (mochi's, which
// serves new subscribers through the broker's usual check of the
// publisher's state) from an ordered watch of the bucket from its start
// (its content at start, then every change in revision order, resumed
// after a reconnect).
//
// Only the watch applies: what it delivers is committed (stored by a
// majority) and in order. A core subscription on the bucket's subjects,
// as this had before, also sees writes JetStream refused (a lost
// compare-and-swap, no quorum) and applies them with no revision to order
// them by: a late copy could bring back a message the watch had already
// deleted, and a refused write was served though no bucket held it
// (TestUncommittedRetainedIsNotServed). After a NATS server dies the
// watch may be late by seconds (nats.go's idle heartbeats); a retained
// message then arrives late, never out of order. Revoked devices' retained
// messages do not wait for it: each node deletes them itself on the
// revocation (broker.onRegistryEvent).

// RetainedBucket is the KV bucket of retained messages.
const RetainedBucket = "fg_retained"

// retained is a retained message's record.
type retained struct {
	Node    string `json:"node"`
	Origin  string `json:"origin"`
	Qos     byte   `json:"qos"`
	Payload []byte `json:"payload"`
	Expiry  int64  `json:"expiry,omitempty"`
	Props   *props `json:"props,omitempty"`
}

// retainedKey is the topic's key: its encoded tokens with '=' for the
// codec's '~' (KV keys allow [-/_=.a-zA-Z0-9]).
func retainedKey(topic string) string {
	return "r." + strings.ReplaceAll(EncodeTopic(topic), "~", "=")
}

func retainedTopic(key string) (string, bool) {
	k, ok := strings.CutPrefix(key, "r.")
	if !ok {
		return "", false
	}
	return DecodeTopic(strings.ReplaceAll(k, "=", "~"))
}

// openRetained opens the bucket and starts the watch that loads and
// follows it.
func (r *Router) openRetained(ctx context.Context) error {
	if r.retainedKV != nil {
		return nil // opened by an earlier attempt of open
	}
	kv, err := natsnode.Bucket(ctx, r.js, RetainedBucket)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(context.Background())
	w, err := kv.WatchAll(wctx)
	if err != nil {
		cancel()
		return err
	}
	r.retainedKV = kv
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer cancel()
		for {
			select {
			case <-r.stop:
				_ = w.Stop()
				return
			case e, ok := <-w.Updates():
				if !ok {
					return
				}
				if e == nil {
					continue // the bucket's content is applied
				}
				op := e.Operation()
				r.applyRetained(e.Key(), e.Value(), op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge)
			}
		}
	}()
	return nil
}

// applyRetained sets (or clears) the local retained message of a key.
func (r *Router) applyRetained(key string, data []byte, del bool) {
	topic, ok := retainedTopic(key)
	if !ok {
		return
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Retain: true}, TopicName: topic}
	if !del {
		var rec retained
		if json.Unmarshal(data, &rec) != nil {
			return
		}
		if rec.Node == r.cfg.Node {
			return // this node's own publish, retained locally already
		}
		pk.FixedHeader.Qos, pk.Payload, pk.Origin, pk.Expiry = rec.Qos, rec.Payload, rec.Origin, rec.Expiry
		if rec.Props != nil {
			pk.Properties.ContentType, pk.Properties.ResponseTopic = rec.Props.ContentType, rec.Props.ResponseTopic
			pk.Properties.CorrelationData, pk.Properties.User = rec.Props.CorrelationData, rec.Props.User
			if rec.Props.PayloadFormat != nil {
				pk.Properties.PayloadFormat, pk.Properties.PayloadFormatFlag = *rec.Props.PayloadFormat, true
			}
		}
	}
	if len(pk.Payload) == 0 {
		pk.Payload = nil
	}
	r.log.Debug("retained message from the cluster", "topic", topic, "delete", len(pk.Payload) == 0)
	r.srv.Topics.RetainMessage(pk)
}

// retain writes a retained publish into the bucket (an empty payload
// deletes the topic's message).
func (r *Router) retain(ctx context.Context, pk packets.Packet, origin string) error {
	if r.retainedKV == nil {
		return errors.New("retained bucket not open")
	}
	key := retainedKey(pk.TopicName)
	if len(pk.Payload) == 0 {
		return r.retainedKV.Delete(ctx, key)
	}
	rec := retained{Node: r.cfg.Node, Origin: origin, Qos: pk.FixedHeader.Qos, Payload: pk.Payload, Expiry: pk.Expiry}
	if m := r.message(pk, origin); m.Header.Get(hProps) != "" {
		var p props
		if json.Unmarshal([]byte(m.Header.Get(hProps)), &p) == nil {
			rec.Props = &p
		}
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	_, err = r.retainedKV.Put(ctx, key, b)
	return err
}
