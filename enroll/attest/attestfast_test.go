package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"reflect"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/fleetgate/fleetgate/devicesdk/tpmkey"
)

// mutations returns b, each single-byte change of it (several values at
// every position), each truncation, and b with a byte appended.
func mutations(b []byte) [][]byte {
	out := [][]byte{b}
	for i := range b {
		for _, v := range []byte{b[i] ^ 1, b[i] ^ 0x80, b[i] + 1, b[i] - 1, 0, 1, 2, 0xff} {
			if v == b[i] {
				continue
			}
			m := bytes.Clone(b)
			m[i] = v
			out = append(out, m)
		}
	}
	for n := range len(b) {
		out = append(out, bytes.Clone(b[:n]))
	}
	return append(out, append(bytes.Clone(b), 0))
}

func certifyAttest2B(typ tpm2.TPMST, safe bool) []byte {
	att := tpm2.TPMSAttest{
		Magic:           tpm2.TPMGeneratedValue,
		Type:            typ,
		QualifiedSigner: tpm2.TPM2BName{Buffer: append([]byte{0, 0x0b}, bytes.Repeat([]byte{7}, 32)...)},
		ExtraData:       tpm2.TPM2BData{Buffer: []byte("0123456789abcdef")},
		ClockInfo:       tpm2.TPMSClockInfo{Clock: 1234567, ResetCount: 3, RestartCount: 2, Safe: safe},
		FirmwareVersion: 0x2000_0001_0000_0002,
		Attested: tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, &tpm2.TPMSCertifyInfo{
			Name:          tpm2.TPM2BName{Buffer: append([]byte{0, 0x0b}, bytes.Repeat([]byte{9}, 32)...)},
			QualifiedName: tpm2.TPM2BName{Buffer: append([]byte{0, 0x0b}, bytes.Repeat([]byte{5}, 32)...)},
		}),
	}
	if typ != tpm2.TPMSTAttestCertify {
		att.Attested = tpm2.NewTPMUAttest(typ, &tpm2.TPMSTimeAttestInfo{})
	}
	return tpm2.Marshal(tpm2.TPM2BAttest(tpm2.BytesAs2B[tpm2.TPMSAttest](tpm2.Marshal(att))))
}

// decodeSignatureReflect is verifyECDSA's decoding through go-tpm.
func decodeSignatureReflect(b []byte) (ecc *tpm2.TPMSSignatureECC, err error) {
	err = safely("TPMT_SIGNATURE", func() error {
		ecc, err = decodeECDSASignatureReflect(b)
		return err
	})
	return ecc, err
}

// The hand decoders of attestfast.go take only what go-tpm's decoder (with
// the canonical-encoding check) takes, and return the same structure:
// for a valid certification and signature and every single-byte change,
// truncation and extension of them, whatever the fast decoder accepts
// go-tpm accepts with a deep-equal result; and every certification or
// ECDSA signature go-tpm accepts, the fast decoder accepts too (so it is
// the one that runs), but for a wrong TPM_GENERATED magic, which go-tpm
// decodes and VerifyCertify refuses after it.
func TestFastDecodersAgreeWithGoTPM(t *testing.T) {
	var inputs [][]byte
	for _, safe := range []bool{true, false} {
		inputs = append(inputs, mutations(certifyAttest2B(tpm2.TPMSTAttestCertify, safe))...)
	}
	inputs = append(inputs, certifyAttest2B(tpm2.TPMSTAttestTime, true), nil, []byte{0, 0})
	fast, slow := 0, 0
	for _, in := range inputs {
		f, ok := decodeCertifyAttest(in)
		s, err := decodeAttestReflect(in)
		if ok {
			fast++
			if err != nil {
				t.Fatalf("fast decoder accepted what go-tpm refuses (%v): %x", err, in)
			}
			if !reflect.DeepEqual(f.att, s.att) || !bytes.Equal(f.raw, s.raw) {
				t.Fatalf("decodings differ for %x:\nfast %+v\n  go-tpm %+v", in, f.att, s.att)
			}
		}
		if err == nil {
			slow++
			if s.att.Type == tpm2.TPMSTAttestCertify && s.att.Magic == tpm2.TPMGeneratedValue && !ok {
				t.Fatalf("go-tpm accepts a certification the fast decoder declines: %x", in)
			}
		}
	}
	if fast < 100 || fast > slow {
		t.Fatalf("fast decoder accepted %d of %d inputs, go-tpm %d", fast, len(inputs), slow)
	}
	t.Logf("attestations: %d inputs, fast decoder accepted %d, go-tpm %d", len(inputs), fast, slow)

	sig := tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{
			Hash:       tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: bytes.Repeat([]byte{3}, 32)},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: bytes.Repeat([]byte{4}, 32)},
		}),
	})
	fast, slow = 0, 0
	sigs := append(mutations(sig), nil)
	for _, in := range sigs {
		f, ok := decodeECDSASignature(in)
		s, err := decodeSignatureReflect(in)
		if ok {
			fast++
			if err != nil {
				t.Fatalf("fast decoder accepted a signature go-tpm refuses (%v): %x", err, in)
			}
			if !reflect.DeepEqual(f, s) {
				t.Fatalf("decodings differ for %x:\nfast %+v\n  go-tpm %+v", in, f, s)
			}
		}
		if err == nil {
			slow++
			if !ok {
				t.Fatalf("go-tpm accepts an ECDSA signature the fast decoder declines: %x", in)
			}
		}
	}
	if fast < 100 {
		t.Fatalf("fast decoder accepted %d of %d signatures", fast, len(sigs))
	}
	t.Logf("signatures: %d inputs, fast decoder accepted %d, go-tpm %d", len(sigs), fast, slow)
}

// eccPublic2B is tmpl with a P-256 key as a TPM2B_PUBLIC.
func eccPublic2B(t testing.TB, tmpl tpm2.TPMTPublic) []byte {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	return tpm2.Marshal(tpm2.New2B(tmpl))
}

// The same for public areas (decodeECCPublic): the AK's and the TLS key's
// templates with a key, and every single-byte change, truncation and
// extension of them; an RSA public area (the EK's template) is left to
// go-tpm.
func TestFastPublicDecoderAgreesWithGoTPM(t *testing.T) {
	ak, tlsKey := eccPublic2B(t, tpmkey.AKTemplate()), eccPublic2B(t, tpmkey.TLSKeyTemplate())
	inputs := append(mutations(ak), mutations(tlsKey)...)
	inputs = append(inputs, tpm2.Marshal(tpm2.New2B(tpm2.RSAEKTemplate)), nil)
	fast, slow := 0, 0
	for _, in := range inputs {
		f, fInner, ok := decodeECCPublic(in)
		s, sInner, err := decodePublicReflect("test", in)
		if ok {
			fast++
			if err != nil {
				t.Fatalf("fast decoder accepted a public area go-tpm refuses (%v): %x", err, in)
			}
			if !reflect.DeepEqual(f, s) || !bytes.Equal(fInner, sInner) {
				t.Fatalf("decodings differ for %x:\nfast %#v\n  go-tpm %#v", in, f, s)
			}
		}
		if err == nil {
			slow++
		}
	}
	for _, in := range [][]byte{ak, tlsKey} {
		if _, _, ok := decodeECCPublic(in); !ok {
			t.Fatalf("fast decoder declines a template's public area: %x", in)
		}
	}
	if _, _, ok := decodeECCPublic(inputs[len(inputs)-2]); ok {
		t.Fatal("fast decoder took an RSA public area")
	}
	if fast < 1000 || fast > slow {
		t.Fatalf("fast decoder accepted %d of %d public areas, go-tpm %d", fast, len(inputs), slow)
	}
	t.Logf("public areas: %d inputs, fast decoder accepted %d, go-tpm %d", len(inputs), fast, slow)
}

// BenchmarkDecodePublic: a TLS key's public area (uncached), decoded by
// attestfast.go and by go-tpm with the canonical-encoding check.
func BenchmarkDecodePublic(b *testing.B) {
	in := eccPublic2B(b, tpmkey.TLSKeyTemplate())
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			if _, _, ok := decodeECCPublic(in); !ok {
				b.Fatal("declined")
			}
		}
	})
	b.Run("go-tpm", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := decodePublicReflect("bench", in); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDecodeCertify: the certification and its signature, decoded by
// attestfast.go and by go-tpm with the canonical-encoding check.
//
//	go test -run '^$' -bench DecodeCertify ./enroll/attest/
func BenchmarkDecodeCertify(b *testing.B) {
	att := certifyAttest2B(tpm2.TPMSTAttestCertify, true)
	sig := tpm2.Marshal(tpm2.TPMTSignature{
		SigAlg: tpm2.TPMAlgECDSA,
		Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA, &tpm2.TPMSSignatureECC{Hash: tpm2.TPMAlgSHA256,
			SignatureR: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}, SignatureS: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)}}),
	})
	b.Run("fast", func(b *testing.B) {
		for b.Loop() {
			if _, ok := decodeCertifyAttest(att); !ok {
				b.Fatal("declined")
			}
			if _, ok := decodeECDSASignature(sig); !ok {
				b.Fatal("declined")
			}
		}
	})
	b.Run("go-tpm", func(b *testing.B) {
		for b.Loop() {
			if _, err := decodeAttestReflect(att); err != nil {
				b.Fatal(err)
			}
			if _, err := decodeSignatureReflect(sig); err != nil {
				b.Fatal(err)
			}
		}
	})
}
