package kvtx

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
)

// JetStream is the cluster's Store: a JetStream KV bucket (R3, history 1,
// atomic batches allowed: natsnode.Bucket). A key's revision is the stream
// sequence of its last write. A Commit is one atomic batch (nats-server
// 2.12+, ADR-50) whose messages carry Nats-Expected-Last-Subject-Sequence:
// the stream applies all of them or, when one expectation fails, none.
type JetStream struct {
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	kv     jetstream.KeyValue
	bucket string
}

// NewJetStream returns the Store of bucket kv (opened with
// natsnode.Bucket) through the connection nc.
func NewJetStream(ctx context.Context, nc *nats.Conn, js jetstream.JetStream, kv jetstream.KeyValue) (*JetStream, error) {
	st, err := js.Stream(ctx, "KV_"+kv.Bucket())
	if err != nil {
		return nil, fmt.Errorf("kvtx: bucket %s: %w", kv.Bucket(), err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("kvtx: bucket %s: %w", kv.Bucket(), err)
	}
	if !info.Config.AllowAtomicPublish {
		return nil, fmt.Errorf("kvtx: bucket %s does not allow atomic batches (open it with natsnode.Bucket)", kv.Bucket())
	}
	return &JetStream{nc: nc, js: js, stream: st, kv: kv, bucket: kv.Bucket()}, nil
}

// KV is the bucket (for watches).
func (j *JetStream) KV() jetstream.KeyValue { return j.kv }

func (j *JetStream) subject(key string) string { return "$KV." + j.bucket + "." + key }

// msgGetResponse is JetStream's answer to STREAM.MSG.GET.
type msgGetResponse struct {
	Message *struct {
		Seq  uint64 `json:"seq"`
		Hdrs []byte `json:"hdrs"`
		Data []byte `json:"data"`
	} `json:"message"`
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
}

// Get implements Store. It asks the stream's leader (STREAM.MSG.GET), not
// a replica: KV buckets allow direct gets, which any replica answers, and
// a replica may not have applied the caller's own last write yet.
func (j *JetStream) Get(ctx context.Context, key string) (Entry, error) {
	if err := CheckKey(key); err != nil {
		return Entry{}, err
	}
	req, _ := json.Marshal(map[string]string{"last_by_subj": j.subject(key)})
	m, err := j.nc.RequestWithContext(ctx, "$JS.API.STREAM.MSG.GET.KV_"+j.bucket, req)
	if err != nil {
		return Entry{}, fmt.Errorf("kvtx: get %s: %w", key, err)
	}
	var r msgGetResponse
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return Entry{}, fmt.Errorf("kvtx: get %s: answer %q: %w", key, m.Data, err)
	}
	if e := r.Error; e != nil {
		if e.Code == 404 {
			return Entry{Key: key}, ErrNotFound
		}
		return Entry{}, fmt.Errorf("kvtx: get %s: %s (%d)", key, e.Description, e.ErrCode)
	}
	if r.Message == nil {
		return Entry{}, fmt.Errorf("kvtx: get %s: empty answer", key)
	}
	if deletedHeader(r.Message.Hdrs) {
		return Entry{Key: key, Rev: r.Message.Seq}, ErrNotFound
	}
	return Entry{Key: key, Value: r.Message.Data, Rev: r.Message.Seq}, nil
}

// deletedHeader: a NATS header block with KV-Operation DEL or PURGE.
func deletedHeader(h []byte) bool {
	for _, line := range strings.Split(string(h), "\r\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), "KV-Operation") {
			switch strings.TrimSpace(v) {
			case "DEL", "PURGE":
				return true
			}
		}
	}
	return false
}

// pubAck is JetStream's answer to a batch's commit.
type pubAck struct {
	Seq   uint64 `json:"seq"`
	Batch string `json:"batch"`
	Count int    `json:"count"`
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
}

// Commit implements Store.
func (j *JetStream) Commit(ctx context.Context, ops ...Op) ([]uint64, error) {
	if err := checkBatch(ops); err != nil {
		return nil, err
	}
	id := nuid.Next()
	var reply *nats.Msg
	for i, op := range ops {
		m := nats.NewMsg(j.subject(op.Key))
		m.Data = op.Value
		if op.Delete {
			m.Data = nil
			m.Header.Set("KV-Operation", "DEL")
		}
		if !op.Any {
			m.Header.Set("Nats-Expected-Last-Subject-Sequence", strconv.FormatUint(op.Expect, 10))
		}
		m.Header.Set("Nats-Batch-Id", id)
		m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(i+1))
		if i < len(ops)-1 {
			if err := j.nc.PublishMsg(m); err != nil {
				return nil, fmt.Errorf("kvtx: commit: %w", err)
			}
			continue
		}
		m.Header.Set("Nats-Batch-Commit", "1")
		var err error
		if reply, err = j.nc.RequestMsgWithContext(ctx, m); err != nil {
			return nil, fmt.Errorf("kvtx: commit: %w", err)
		}
	}
	var ack pubAck
	if err := json.Unmarshal(reply.Data, &ack); err != nil {
		return nil, fmt.Errorf("kvtx: commit: answer %q: %w", reply.Data, err)
	}
	if e := ack.Error; e != nil {
		if e.ErrCode == 10071 || e.ErrCode == 10164 || strings.Contains(e.Description, "last sequence") {
			return nil, fmt.Errorf("%w: %s", ErrRevision, e.Description)
		}
		return nil, fmt.Errorf("kvtx: commit: %s (%d)", e.Description, e.ErrCode)
	}
	if ack.Batch != id || ack.Count != len(ops) || ack.Seq < uint64(len(ops)) {
		return nil, fmt.Errorf("kvtx: commit: answer %q is not for this batch of %d", reply.Data, len(ops))
	}
	// A batch is stored contiguously: its last message has ack.Seq.
	revs := make([]uint64, len(ops))
	for i := range ops {
		revs[i] = ack.Seq - uint64(len(ops)-1-i)
	}
	return revs, nil
}

// List implements Store.
func (j *JetStream) List(ctx context.Context, prefix string) ([]Entry, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	w, err := j.kv.Watch(ctx, prefix+">", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("kvtx: list %s: %w", prefix, err)
	}
	defer w.Stop()
	var out []Entry
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("kvtx: list: watch ended")
			}
			if e == nil { // the initial values are all in
				slices.SortFunc(out, func(a, b Entry) int { return strings.Compare(a.Key, b.Key) })
				return out, nil
			}
			out = append(out, Entry{Key: e.Key(), Value: e.Value(), Rev: e.Revision()})
		}
	}
}

// Scan implements Log: an ephemeral consumer (R1, in memory, placed with
// the stream) from revision from on the prefix's subjects, read until
// revision to or until nothing is pending, then deleted.
func (j *JetStream) Scan(ctx context.Context, prefix string, from, to uint64, fn func(Entry) error) error {
	if err := checkPrefix(prefix); err != nil {
		return err
	}
	from = max(from, 1)
	if to <= from {
		return nil
	}
	cons, err := j.js.CreateConsumer(ctx, "KV_"+j.bucket, jetstream.ConsumerConfig{
		FilterSubject: j.subject(prefix + ">"), DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: from,
		AckPolicy: jetstream.AckNonePolicy, InactiveThreshold: 30 * time.Second, MemoryStorage: true, Replicas: 1})
	if err != nil {
		return fmt.Errorf("kvtx: scan %s: %w", prefix, err)
	}
	info := cons.CachedInfo()
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = j.js.DeleteConsumer(dctx, "KV_"+j.bucket, info.Name)
	}()
	pending := info.NumPending
	for pending > 0 {
		batch, err := cons.Fetch(int(min(pending, 256)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return fmt.Errorf("kvtx: scan %s: %w", prefix, err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				return fmt.Errorf("kvtx: scan %s: %w", prefix, err)
			}
			seq := md.Sequence.Stream
			pending = md.NumPending
			if seq >= to {
				return nil
			}
			if op := m.Headers().Get("KV-Operation"); op == "DEL" || op == "PURGE" {
				continue
			}
			if err := fn(Entry{Key: strings.TrimPrefix(m.Subject(), "$KV."+j.bucket+"."), Value: m.Data(), Rev: seq}); err != nil {
				return err
			}
		}
		if err := batch.Error(); err != nil {
			return fmt.Errorf("kvtx: scan %s: %w", prefix, err)
		}
		if n == 0 {
			return fmt.Errorf("kvtx: scan %s: no message delivered with %d pending", prefix, pending)
		}
	}
	return nil
}

// LastRev implements Log: the stream's last sequence, from its leader.
func (j *JetStream) LastRev(ctx context.Context) (uint64, error) {
	info, err := j.stream.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("kvtx: last revision: %w", err)
	}
	return info.State.LastSeq, nil
}
