package cluster

import (
	"context"
	"encoding/json"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/fleetgate/fleetgate/cluster/natsnode"
)

// Wills of a node that dies. The session record holds the connection's
// will. Every node writes its liveness key in the KV bucket fg_nodes every
// second (acknowledged by a majority only, so a node cut off from the
// quorum stops writing it). A node that could write its own key and sees
// another's older than deadAfter sweeps that node's records: each online
// one is marked offline by compare-and-swap, and the node whose swap
// succeeded publishes the will — one node, once. A session resumed later
// on any node is replayed from the dead node's last proof of life.

// NodesBucket is the KV bucket of node liveness keys.
const NodesBucket = "fg_nodes"

const (
	liveEvery = time.Second
	deadAfter = 5 * time.Second
)

// openLive opens the liveness bucket and writes this node's key once: a
// node is ready only when the others can see it alive.
func (s *sessions) openLive(ctx context.Context) error {
	kv, err := natsnode.Bucket(ctx, s.r.js, NodesBucket)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, s.r.cfg.Node, []byte(time.Now().UTC().Format(time.RFC3339Nano))); err != nil {
		return err
	}
	s.nodes = kv
	return nil
}

// will is a session's Last Will.
type will struct {
	Topic   string                 `json:"topic"`
	Payload []byte                 `json:"payload,omitempty"`
	Qos     byte                   `json:"qos"`
	Retain  bool                   `json:"retain,omitempty"`
	User    []packets.UserProperty `json:"user,omitempty"`
}

func willOf(cl *mqtt.Client) *will {
	w := cl.Properties.Will
	if w.Flag == 0 || w.TopicName == "" {
		return nil
	}
	return &will{Topic: w.TopicName, Payload: w.Payload, Qos: w.Qos, Retain: w.Retain, User: w.User}
}

// live writes this node's liveness key and sweeps dead nodes until ctx
// ends.
func (s *sessions) live(ctx context.Context) {
	kv := s.nodes
	swept := map[string]uint64{} // node → revision of its key when swept
	t := time.NewTicker(liveEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		wctx, cancel := context.WithTimeout(ctx, liveEvery)
		_, err := kv.Put(wctx, s.r.cfg.Node, []byte(time.Now().UTC().Format(time.RFC3339Nano)))
		cancel()
		if err != nil {
			s.r.log.Debug("liveness key not written (minority?)", "err", err)
			continue // not on the majority side: judge nobody
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		keys, err := kv.Keys(lctx)
		if err != nil {
			s.r.log.Debug("liveness keys not listed", "err", err)
		}
		for _, node := range keys {
			if err != nil || node == s.r.cfg.Node {
				continue
			}
			e, gerr := kv.Get(lctx, node)
			if gerr != nil || time.Since(e.Created()) < deadAfter || swept[node] == e.Revision() {
				continue
			}
			swept[node] = e.Revision()
			s.r.log.Warn("cluster node silent: sending the wills of its sessions", "dead", node, "last_seen", e.Created())
			s.sweep(lctx, node, e.Created())
		}
		cancel()
	}
}

// sweep takes over the online records of a dead node.
func (s *sessions) sweep(ctx context.Context, dead string, lastSeen time.Time) {
	lister, err := s.kv.ListKeys(ctx)
	if err != nil {
		return
	}
	for key := range lister.Keys() {
		id, ok := keyID(key)
		if !ok {
			continue
		}
		e, err := s.kv.Get(ctx, key)
		if err != nil {
			continue
		}
		var rec record
		if json.Unmarshal(e.Value(), &rec) != nil || rec.Node != dead || !rec.Online {
			continue
		}
		w := rec.Will
		rec.Online, rec.Will, rec.Since, rec.ReplayFrom = false, nil, time.Now().UTC(), lastSeen.UTC()
		b, _ := json.Marshal(rec)
		if _, err := s.kv.Update(ctx, key, b, e.Revision()); err != nil {
			continue // another node swept it, or the client came back
		}
		if w != nil {
			s.sendWill(ctx, id, w)
		}
	}
}

// sendWill publishes a dead connection's will: to the other nodes, into the
// retained bucket if it retains, and to this node's subscribers.
func (s *sessions) sendWill(ctx context.Context, id string, w *will) {
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: w.Qos, Retain: w.Retain},
		TopicName: w.Topic, Payload: w.Payload, Origin: id, Created: time.Now().Unix()}
	pk.Properties.User = w.User
	r := s.r
	if w.Retain {
		if err := r.retain(ctx, pk, id); err != nil {
			r.log.Warn("will not retained in the cluster", "client", id, "err", err)
		}
	}
	m := r.message(pk, id)
	var err error
	if pk.FixedHeader.Qos == 0 {
		err = r.cfg.NC.PublishMsg(m)
	} else {
		_, err = r.js.PublishMsg(ctx, m)
	}
	if err != nil {
		r.log.Warn("will of a dead node's session not routed", "client", id, "err", err)
	}
	if pk.FixedHeader.Qos > 0 {
		pk.PacketID = 1
	}
	r.pause.RLock()
	err = r.srv.InjectPacket(r.route, pk)
	r.pause.RUnlock()
	if err != nil {
		r.log.Warn("will of a dead node's session not delivered here", "client", id, "err", err)
	}
	r.log.Info("will of a dead node's session sent", "client", id, "topic", w.Topic)
}
