package bench

// The floor of a fan-in message's broker CPU (docs/performance.md,
// "Per-message cost"): what any broker must do for one 64-byte QoS 0
// PUBLISH of scenario 3 that arrives in a TLS record with others and
// leaves in one with others: open it (AES-128-GCM), decode the MQTT
// framing, encode it for the subscriber, seal it. No network, no routing.
//
//	go test -run '^$' -bench Floor -count 6 ./bench/

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
)

// floorBatch is how many PUBLISH share a TLS record: the generator writes
// 32 per record; the broker's writer batches up to 16 KiB.
const floorBatch = 32

func BenchmarkFloor(b *testing.B) {
	topic := "devices/bench-00001/telemetry"
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, TopicName: topic, Payload: newPayload(), ProtocolVersion: 4}
	var one bytes.Buffer
	if err := pk.PublishEncode(&one); err != nil {
		b.Fatal(err)
	}
	record := bytes.Repeat(one.Bytes(), floorBatch)
	block, _ := aes.NewCipher(make([]byte, 16))
	aead, _ := cipher.NewGCM(block)
	nonce := make([]byte, aead.NonceSize())
	sealed := aead.Seal(nil, nonce, record, nil)
	plain := make([]byte, 0, len(record))
	out := make([]byte, 0, len(sealed))
	var enc bytes.Buffer
	b.Run("aes-gcm-open+seal", func(b *testing.B) {
		b.SetBytes(int64(len(one.Bytes())))
		for i := 0; b.Loop(); i++ {
			if i%floorBatch == 0 { // one record per batch, each way
				var err error
				if plain, err = aead.Open(plain[:0], nonce, sealed, nil); err != nil {
					b.Fatal(err)
				}
				out = aead.Seal(out[:0], nonce, plain, nil)
			}
		}
	})
	b.Run("mqtt-decode+encode", func(b *testing.B) {
		body := one.Bytes()[2:] // after the fixed header (1 byte + 1 length byte)
		for b.Loop() {
			var in packets.Packet
			in.FixedHeader = packets.FixedHeader{Type: packets.Publish}
			if err := in.PublishDecode(body); err != nil {
				b.Fatal(err)
			}
			enc.Reset()
			if err := in.PublishEncode(&enc); err != nil {
				b.Fatal(err)
			}
		}
	})
}
