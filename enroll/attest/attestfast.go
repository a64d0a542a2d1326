package attest

import (
	"encoding/binary"

	"github.com/google/go-tpm/tpm2"
)

// Decoding without reflection the two structures of every TPM enrollment's
// round 2: the TPMS_ATTEST of a TPM2_Certify and its ECDSA TPMT_SIGNATURE.
// go-tpm decodes them through reflection and decodeAttest / verifyECDSA
// re-encoded them (through reflection again) to refuse any encoding that
// is not canonical: about 200 µs of server CPU per enrollment
// (docs/performance.md, "Enrollment").
//
// The decoders here take only the exact canonical encoding of the one
// shape they know (every length consistent, no trailing byte, TPMI_YES_NO
// 0 or 1, the TPM_GENERATED magic, the certify type, the ECDSA algorithm),
// and return the structure go-tpm would have returned for the same bytes
// (TestFastDecodersAgreeWithGoTPM checks it byte change by byte change).
// Anything else (another type, a malformed or non-canonical structure)
// they decline (ok false), and go-tpm's decoder runs as before, with its
// errors. Every check after decoding runs as before.

// reader reads big-endian TPM fields; a read past the end sets bad.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n > len(r.b) {
		r.bad = true
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) u8() uint8 {
	if v := r.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if v := r.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if v := r.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if v := r.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

// sized reads a TPM2B's buffer (a copy, never nil, as go-tpm's).
func (r *reader) sized() []byte {
	v := r.take(int(r.u16()))
	if r.bad {
		return nil
	}
	return append(make([]byte, 0, len(v)), v...)
}

// decodeCertifyAttest decodes a TPM2B_ATTEST holding a TPM2_Certify
// attestation, in its canonical encoding only.
func decodeCertifyAttest(b []byte) (*decodedAttest, bool) {
	r := reader{b: b}
	raw := r.take(int(r.u16()))
	if r.bad || len(raw) == 0 || len(r.b) != 0 {
		return nil, false
	}
	r = reader{b: raw}
	att := &tpm2.TPMSAttest{
		Magic: tpm2.TPMGenerated(r.u32()),
		Type:  tpm2.TPMST(r.u16()),
	}
	if r.bad || att.Magic != tpm2.TPMGeneratedValue || att.Type != tpm2.TPMSTAttestCertify {
		return nil, false
	}
	att.QualifiedSigner.Buffer = r.sized()
	att.ExtraData.Buffer = r.sized()
	att.ClockInfo.Clock = r.u64()
	att.ClockInfo.ResetCount = r.u32()
	att.ClockInfo.RestartCount = r.u32()
	safe := r.u8()
	att.ClockInfo.Safe = safe == 1
	att.FirmwareVersion = r.u64()
	info := &tpm2.TPMSCertifyInfo{}
	info.Name.Buffer = r.sized()
	info.QualifiedName.Buffer = r.sized()
	if r.bad || len(r.b) != 0 || safe > 1 {
		return nil, false
	}
	att.Attested = tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify, info)
	return &decodedAttest{att: att, raw: raw}, true
}

// decodeECDSASignature decodes a TPMT_SIGNATURE of the ECDSA algorithm, in
// its canonical encoding only.
func decodeECDSASignature(b []byte) (*tpm2.TPMSSignatureECC, bool) {
	r := reader{b: b}
	if tpm2.TPMAlgID(r.u16()) != tpm2.TPMAlgECDSA || r.bad {
		return nil, false
	}
	sig := &tpm2.TPMSSignatureECC{Hash: tpm2.TPMIAlgHash(r.u16())}
	sig.SignatureR.Buffer = r.sized()
	sig.SignatureS.Buffer = r.sized()
	if r.bad || len(r.b) != 0 {
		return nil, false
	}
	return sig, true
}
