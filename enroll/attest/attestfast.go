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

// objectBits are the TPMA_OBJECT bits go-tpm names; the others are
// reserved (a structure with one set is left to go-tpm).
const objectBits = 1<<1 | 1<<2 | 1<<4 | 1<<5 | 1<<6 | 1<<7 | 1<<8 | 1<<10 | 1<<11 | 1<<16 | 1<<17 | 1<<18 | 1<<19

// decodeECCPublic decodes a TPM2B_PUBLIC holding an ECC public area (no
// symmetric algorithm, no KDF, signing scheme NULL or one with a hash:
// the AK's and the TLS key's shape), in its canonical encoding only. It
// returns the structure and its TPMT_PUBLIC bytes (the name's input).
func decodeECCPublic(b []byte) (*tpm2.TPMTPublic, []byte, bool) {
	r := reader{b: b}
	inner := r.take(int(r.u16()))
	if r.bad || len(inner) == 0 || len(r.b) != 0 {
		return nil, nil, false
	}
	r = reader{b: inner}
	pub := &tpm2.TPMTPublic{Type: tpm2.TPMIAlgPublic(r.u16()), NameAlg: tpm2.TPMIAlgHash(r.u16())}
	attrs := r.u32()
	if r.bad || pub.Type != tpm2.TPMAlgECC || attrs&^objectBits != 0 {
		return nil, nil, false
	}
	bit := func(n int) bool { return attrs&(1<<n) != 0 }
	pub.ObjectAttributes = tpm2.TPMAObject{FixedTPM: bit(1), STClear: bit(2), FixedParent: bit(4), SensitiveDataOrigin: bit(5),
		UserWithAuth: bit(6), AdminWithPolicy: bit(7), FirmwareLimited: bit(8), NoDA: bit(10), EncryptedDuplication: bit(11),
		Restricted: bit(16), Decrypt: bit(17), SignEncrypt: bit(18), X509Sign: bit(19)}
	pub.AuthPolicy.Buffer = r.sized()
	var parms tpm2.TPMSECCParms
	if parms.Symmetric.Algorithm = tpm2.TPMIAlgSymObject(r.u16()); parms.Symmetric.Algorithm != tpm2.TPMAlgNull {
		return nil, nil, false
	}
	switch parms.Scheme.Scheme = tpm2.TPMIAlgECCScheme(r.u16()); parms.Scheme.Scheme {
	case tpm2.TPMAlgNull:
	case tpm2.TPMAlgECDSA:
		parms.Scheme.Details = tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMIAlgHash(r.u16())})
	default:
		return nil, nil, false
	}
	parms.CurveID = tpm2.TPMIECCCurve(r.u16())
	if parms.KDF.Scheme = tpm2.TPMIAlgKDF(r.u16()); parms.KDF.Scheme != tpm2.TPMAlgNull {
		return nil, nil, false
	}
	var point tpm2.TPMSECCPoint
	point.X.Buffer = r.sized()
	point.Y.Buffer = r.sized()
	if r.bad || len(r.b) != 0 {
		return nil, nil, false
	}
	pub.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &parms)
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &point)
	return pub, inner, true
}
