// Package attest verifies, on the enrollment server, what a device claims
// about its TPM. It is pure: no TPM, no I/O, no clock of its own.
//
// The checks, in the order the server applies them (chain, then residency,
// then possession):
//  1. VerifyEKCertificate: the EK certificate chains to a configured TPM
//     manufacturer root; EKPublicFromCert gives the EK public area. The
//     server never uses an EK public key the device merely claims.
//  2. VerifyAKPublic and MakeCredential: the AK is a restricted signing key
//     bound to its TPM; the credential can only be activated by the TPM that
//     holds both that EK and that AK (TPM 2.0 Part 1, 24).
//  3. VerifyCertify: the AK certified the TLS key (TPM2_Certify) with the
//     server's nonce; the TLS key is a non-exportable, non-restricted ECC
//     P-256 signing key; and it is the key in the CSR.
//
// Every input is untrusted and decoded defensively: lengths are exact,
// encodings must be canonical, every decoded structure is nil-checked, and a
// panic inside go-tpm's reflection-based decoder is turned into ErrMalformed.
package attest

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/big"

	"github.com/google/go-tpm/tpm2"
)

// SecretSize is the size of the credential secret MakeCredential generates.
const SecretSize = 32

// MinNonceSize is the smallest nonce VerifyCertify accepts.
const MinNonceSize = 16

// safely runs f and turns a panic into ErrMalformed. go-tpm's decoder is
// reflection-based and not hardened against hostile input; a crafted
// structure must not take the server down.
func safely(what string, f func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("attest: decode %s: %w: panic: %v", what, ErrMalformed, r)
		}
	}()
	return f()
}

// publicArea is a decoded TPM2B_PUBLIC: the public area and its TPM name
// (nil if its name algorithm is not one this package accepts). Shared
// through publics: never modified.
type publicArea struct {
	pub  *tpm2.TPMTPublic
	name []byte
}

// decodePublic decodes a TPM2B_PUBLIC. Its inner TPMT_PUBLIC bytes must be
// exactly the canonical encoding of the decoded structure, so that the name
// (computed from those bytes) is the name of the structure checked.
// Successful decodings are remembered by their exact bytes (publics):
// decoding is a pure function of them.
func decodePublic(what string, b []byte) (*publicArea, error) {
	if pa, ok := publics.get(b); ok {
		return pa, nil
	}
	pub, inner, ok := decodeECCPublic(b) // attestfast.go
	if !ok {
		var err error
		if pub, inner, err = decodePublicReflect(what, b); err != nil {
			return nil, err
		}
	}
	pa := &publicArea{pub: pub, name: nameOfBytes(pub.NameAlg, inner)}
	publics.put(b, pa)
	return pa, nil
}

// decodePublicReflect is decodePublic through go-tpm's decoder, for every
// public area decodeECCPublic does not take (and its errors).
func decodePublicReflect(what string, b []byte) (*tpm2.TPMTPublic, []byte, error) {
	var pub *tpm2.TPMTPublic
	var inner []byte
	err := safely(what, func() error {
		p2b, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
		if err != nil {
			return err
		}
		if p2b == nil {
			return errors.New("nil TPM2B_PUBLIC")
		}
		inner = p2b.Bytes()
		if len(inner) == 0 || len(b) != 2+len(inner) {
			return errors.New("TPM2B_PUBLIC size does not match its contents")
		}
		pub, err = p2b.Contents()
		if err != nil {
			return err
		}
		if pub == nil {
			return errors.New("nil TPMT_PUBLIC")
		}
		if !bytes.Equal(tpm2.Marshal(*pub), inner) {
			return errNotCanonical
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, nil, err
		}
		return nil, nil, fmt.Errorf("attest: decode %s: %w: %w", what, ErrMalformed, err)
	}
	return pub, inner, nil
}

// nameOfBytes is the TPM name nameAlg || H_nameAlg(tpmtPublic) of the
// canonical TPMT_PUBLIC bytes, what tpm2.ObjectName computes from the
// decoded structure; nil for a name algorithm this package refuses.
func nameOfBytes(alg tpm2.TPMIAlgHash, tpmtPublic []byte) []byte {
	newHash, _, ok := hashFor(alg)
	if !ok {
		return nil
	}
	h := newHash()
	h.Write(tpmtPublic)
	name := make([]byte, 2, 2+h.Size())
	binary.BigEndian.PutUint16(name, uint16(alg))
	return h.Sum(name)
}

// Name returns the TPM name of a public area: nameAlg || H_nameAlg(public)
// (TPM 2.0 Part 1, 16).
func Name(pub *tpm2.TPMTPublic) ([]byte, error) {
	if pub == nil {
		return nil, fmt.Errorf("attest: name of nil public area: %w", ErrMalformed)
	}
	var name []byte
	err := safely("public area", func() error {
		n, err := tpm2.ObjectName(pub)
		if err != nil {
			return err
		}
		if n == nil {
			return errors.New("nil name")
		}
		name = n.Buffer
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, err
		}
		return nil, fmt.Errorf("attest: name: %w: %w", ErrKeyType, err)
	}
	return name, nil
}

// hashFor maps the name and signature hash algorithms this package accepts.
func hashFor(alg tpm2.TPMIAlgHash) (func() hash.Hash, crypto.Hash, bool) {
	switch alg {
	case tpm2.TPMAlgSHA256:
		return sha256.New, crypto.SHA256, true
	case tpm2.TPMAlgSHA384:
		return sha512.New384, crypto.SHA384, true
	case tpm2.TPMAlgSHA512:
		return sha512.New, crypto.SHA512, true
	}
	return nil, 0, false
}

// eccKey returns the ECDSA public key of an ECC public area on an accepted
// curve, checking that the point is on the curve.
func eccKey(what string, pub *tpm2.TPMTPublic, curves ...tpm2.TPMECCCurve) (*ecdsa.PublicKey, *tpm2.TPMSECCParms, error) {
	if pub.Type != tpm2.TPMAlgECC {
		return nil, nil, fmt.Errorf("attest: %s is algorithm %#x, want ECC: %w", what, uint16(pub.Type), ErrKeyType)
	}
	params, err := pub.Parameters.ECCDetail()
	if err != nil || params == nil {
		return nil, nil, fmt.Errorf("attest: %s ECC parameters: %w", what, ErrMalformed)
	}
	var curve elliptic.Curve
	for _, c := range curves {
		if params.CurveID == c {
			switch c {
			case tpm2.TPMECCNistP256:
				curve = elliptic.P256()
			case tpm2.TPMECCNistP384:
				curve = elliptic.P384()
			}
		}
	}
	if curve == nil {
		return nil, nil, fmt.Errorf("attest: %s curve %#x: %w", what, uint16(params.CurveID), ErrKeyType)
	}
	pt, err := pub.Unique.ECC()
	if err != nil || pt == nil {
		return nil, nil, fmt.Errorf("attest: %s ECC point: %w", what, ErrMalformed)
	}
	size := (curve.Params().BitSize + 7) / 8
	if len(pt.X.Buffer) != size || len(pt.Y.Buffer) != size {
		return nil, nil, fmt.Errorf("attest: %s ECC point has wrong coordinate size: %w", what, ErrMalformed)
	}
	key := &ecdsa.PublicKey{
		Curve: curve,
		X:     new(big.Int).SetBytes(pt.X.Buffer),
		Y:     new(big.Int).SetBytes(pt.Y.Buffer),
	}
	// ECDH performs the on-curve check crypto/ecdsa leaves to Verify.
	if _, err := key.ECDH(); err != nil {
		return nil, nil, fmt.Errorf("attest: %s ECC point: %w: %w", what, ErrMalformed, err)
	}
	return key, params, nil
}

// checkNameAlg accepts SHA-256 and stronger name algorithms.
func checkNameAlg(what string, pub *tpm2.TPMTPublic) error {
	if _, _, ok := hashFor(pub.NameAlg); !ok {
		return fmt.Errorf("attest: %s name algorithm %#x: %w", what, uint16(pub.NameAlg), ErrKeyType)
	}
	return nil
}

// nonExportable reports whether the key was generated in its TPM and can
// never leave it (TPM 2.0 Part 1, 27.2: fixedTPM, fixedParent,
// sensitiveDataOrigin).
func nonExportable(a tpm2.TPMAObject) bool {
	return a.FixedTPM && a.FixedParent && a.SensitiveDataOrigin
}

// VerifyAKPublic decodes an AK public area (TPM2B_PUBLIC) and checks that it
// is a restricted, signing-only ECC key (P-256 or P-384, ECDSA with SHA-256
// or SHA-384) that was generated in, and cannot leave, its TPM. A restricted
// signing key only signs digests the TPM computed itself, so it cannot be
// made to sign a forged TPMS_ATTEST (Part 1, 25.2.3). It is VerifyAK's
// Public: the public area must not be modified.
//
// Known limitation: RSA AKs are not supported (ErrKeyType).
func VerifyAKPublic(akPubBytes []byte) (*tpm2.TPMTPublic, error) {
	ak, err := VerifyAK(akPubBytes)
	if err != nil {
		return nil, err
	}
	return ak.Public, nil
}

// AK is an attestation key that passed VerifyAK. It is immutable and may be
// shared.
type AK struct {
	// Public is the AK's public area. It must not be modified.
	Public *tpm2.TPMTPublic
	// Name is the AK's TPM name, nameAlg || H_nameAlg(TPMT_PUBLIC), which
	// MakeCredential binds the credential to.
	Name []byte
	key  *ecdsa.PublicKey
	hash tpm2.TPMIAlgHash
}

// VerifyAK is VerifyAKPublic that also returns the AK's name and signing
// key. Verified AKs are remembered by their exact bytes: the checks are a
// pure function of them.
func VerifyAK(akPubBytes []byte) (*AK, error) {
	if ak, ok := aks.get(akPubBytes); ok {
		return ak, nil
	}
	pa, err := decodePublic("AK public", akPubBytes)
	if err != nil {
		return nil, err
	}
	pub := pa.pub
	if pub.Type != tpm2.TPMAlgECC {
		return nil, fmt.Errorf("attest: AK is algorithm %#x, want ECC: %w", uint16(pub.Type), ErrKeyType)
	}
	a := pub.ObjectAttributes
	if !a.Restricted {
		return nil, fmt.Errorf("attest: AK: %w", ErrAKNotRestricted)
	}
	if !a.SignEncrypt || a.Decrypt {
		return nil, fmt.Errorf("attest: AK must be signing only (sign=%t decrypt=%t): %w", a.SignEncrypt, a.Decrypt, ErrAKAttributes)
	}
	if !nonExportable(a) {
		return nil, fmt.Errorf("attest: AK (fixedTPM=%t fixedParent=%t sensitiveDataOrigin=%t): %w: %w",
			a.FixedTPM, a.FixedParent, a.SensitiveDataOrigin, ErrAKAttributes, ErrKeyExportable)
	}
	if err := checkNameAlg("AK", pub); err != nil {
		return nil, err
	}
	if err := checkAuthorization("AK", pub, ErrAKPolicy); err != nil {
		return nil, err
	}
	ak, err := akFromPublic(pub)
	if err != nil {
		return nil, err
	}
	if pa.name == nil { // checkNameAlg accepted it: cannot happen
		return nil, fmt.Errorf("attest: AK name: %w", ErrKeyType)
	}
	ak.Name = pa.name
	aks.put(akPubBytes, ak)
	return ak, nil
}

// akFromPublic returns the AK's ECDSA key and signature hash (without the
// name).
func akFromPublic(pub *tpm2.TPMTPublic) (*AK, error) {
	key, params, err := eccKey("AK", pub, tpm2.TPMECCNistP256, tpm2.TPMECCNistP384)
	if err != nil {
		return nil, err
	}
	h, err := akSigHash(params)
	if err != nil {
		return nil, err
	}
	if err := signingOnlyParms("AK", params); err != nil {
		return nil, err
	}
	return &AK{Public: pub, key: key, hash: h}, nil
}

// curveHash is the one signature hash accepted for a curve: SHA-256 for
// P-256, SHA-384 for P-384 (the hash whose size matches the curve's).
func curveHash(c tpm2.TPMECCCurve) tpm2.TPMIAlgHash {
	switch c {
	case tpm2.TPMECCNistP256:
		return tpm2.TPMAlgSHA256
	case tpm2.TPMECCNistP384:
		return tpm2.TPMAlgSHA384
	}
	return tpm2.TPMAlgNull
}

// akSigHash returns the hash of a restricted ECC AK's ECDSA scheme, which
// must be the hash that matches its curve.
func akSigHash(params *tpm2.TPMSECCParms) (tpm2.TPMIAlgHash, error) {
	if params.Scheme.Scheme != tpm2.TPMAlgECDSA {
		return 0, fmt.Errorf("attest: AK scheme %#x, want ECDSA: %w", uint16(params.Scheme.Scheme), ErrKeyType)
	}
	d, err := params.Scheme.Details.ECDSA()
	if err != nil || d == nil {
		return 0, fmt.Errorf("attest: AK ECDSA scheme details: %w", ErrMalformed)
	}
	if want := curveHash(params.CurveID); d.HashAlg != want {
		return 0, fmt.Errorf("attest: AK scheme hash %#x on curve %#x, want %#x: %w", uint16(d.HashAlg), uint16(params.CurveID), uint16(want), ErrKeyType)
	}
	return d.HashAlg, nil
}

// signingOnlyParms checks the ECC parameters a signing key has no use for
// are NULL: no symmetric algorithm and no KDF.
func signingOnlyParms(what string, params *tpm2.TPMSECCParms) error {
	if params.Symmetric.Algorithm != tpm2.TPMAlgNull {
		return fmt.Errorf("attest: %s symmetric algorithm %#x, want NULL: %w", what, uint16(params.Symmetric.Algorithm), ErrKeyType)
	}
	if params.KDF.Scheme != tpm2.TPMAlgNull {
		return fmt.Errorf("attest: %s KDF %#x, want NULL: %w", what, uint16(params.KDF.Scheme), ErrKeyType)
	}
	return nil
}

// checkAuthorization accepts only keys used with their authValue, as the
// device SDK creates them: empty authPolicy, adminWithPolicy clear and
// userWithAuth set. A policy could authorize uses outside the enrollment
// flow (e.g. by another party, or with PolicyDuplicationSelect-style
// commands), which the server cannot see.
func checkAuthorization(what string, pub *tpm2.TPMTPublic, sentinel error) error {
	a := pub.ObjectAttributes
	if len(pub.AuthPolicy.Buffer) != 0 || a.AdminWithPolicy || !a.UserWithAuth {
		return fmt.Errorf("attest: %s (authPolicy %d bytes, adminWithPolicy=%t, userWithAuth=%t), want authValue only: %w",
			what, len(pub.AuthPolicy.Buffer), a.AdminWithPolicy, a.UserWithAuth, sentinel)
	}
	return nil
}

// hierarchies are the handles a primary or external object's qualified
// name is computed from (TPM 2.0 Part 1, 16.6).
var hierarchies = []tpm2.TPMHandle{tpm2.TPMRHOwner, tpm2.TPMRHEndorsement, tpm2.TPMRHPlatform, tpm2.TPMRHNull}

// checkQualifiedName checks the certified object's qualified name: the
// nameAlg of name, the size of its digest, not the name itself, and not
// the qualified name of a primary or external object of any hierarchy,
// nameAlg || H(hierarchy handle || name). The TLS key is a child of the SRK,
// so its qualified name hashes the SRK's qualified name, which the server
// cannot know but which is none of those.
func checkQualifiedName(name, qn []byte) error {
	bad := func(why string) error {
		return fmt.Errorf("attest: certified qualified name %s: %w", why, ErrCertifyQualifiedName)
	}
	if len(qn) != len(name) || len(name) < 2 || !bytes.Equal(qn[:2], name[:2]) {
		return bad("has another hash algorithm or size than the name")
	}
	if bytes.Equal(qn, name) {
		return bad("equals the name")
	}
	newHash, _, ok := hashFor(tpm2.TPMIAlgHash(binary.BigEndian.Uint16(name)))
	if !ok {
		return bad("has an unsupported hash algorithm")
	}
	for _, h := range hierarchies {
		d := newHash()
		_ = binary.Write(d, binary.BigEndian, uint32(h))
		d.Write(name)
		if bytes.Equal(qn[2:], d.Sum(nil)) {
			return bad(fmt.Sprintf("is that of a primary or external object of hierarchy %#x", uint32(h)))
		}
	}
	return nil
}

// MakeCredential encrypts a fresh random secret (SecretSize bytes) to the EK
// so that only the TPM holding that EK and an object named akName can recover
// it (TPM2_MakeCredential in software, Part 1, 24.4). credBlob and encSecret
// are the contents of the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
// (without size prefix), as TPM2_ActivateCredential takes them. The server
// keeps secret and compares it in constant time with what the device returns.
// ekPub must come from EKPublicFromCert on a verified certificate; akName
// from Name on a verified AK public. rand nil means crypto/rand.
func MakeCredential(rnd io.Reader, ekPub *tpm2.TPMTPublic, akName []byte) (credBlob, encSecret, secret []byte, err error) {
	if rnd == nil {
		rnd = rand.Reader
	}
	if ekPub == nil {
		return nil, nil, nil, fmt.Errorf("attest: make credential: nil EK public: %w", ErrMalformed)
	}
	if len(akName) < 2 {
		return nil, nil, nil, fmt.Errorf("attest: make credential: AK name too short: %w", ErrMalformed)
	}
	alg := tpm2.TPMIAlgHash(uint16(akName[0])<<8 | uint16(akName[1]))
	newHash, _, ok := hashFor(alg)
	if !ok || len(akName) != 2+newHash().Size() {
		return nil, nil, nil, fmt.Errorf("attest: make credential: AK name is not a SHA-2 name: %w", ErrMalformed)
	}
	key, err := tpm2.ImportEncapsulationKey(ekPub)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("attest: tpm2.ImportEncapsulationKey: %w: %w", ErrKeyType, err)
	}
	secret = make([]byte, SecretSize)
	if _, err := io.ReadFull(rnd, secret); err != nil {
		return nil, nil, nil, fmt.Errorf("attest: credential secret: %w", err)
	}
	credBlob, encSecret, err = tpm2.CreateCredential(rnd, key, akName, secret)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("attest: tpm2.CreateCredential: %w", err)
	}
	return credBlob, encSecret, secret, nil
}

// VerifyCertify verifies TPM2_Certify evidence: that the AK (from
// VerifyAKPublic, already bound to the EK by credential activation) signed
// attestBytes (TPM2B_ATTEST) with sigBytes (TPMT_SIGNATURE); that the
// attestation is a TPM-generated certification qualified with nonce; that the
// certified name is the name of tlsPubBytes (TPM2B_PUBLIC); that this key is
// a non-exportable, non-restricted, signing-only ECC NIST P-256 key; and
// that it is csrPublicKey.
func VerifyCertify(akPub *tpm2.TPMTPublic, tlsPubBytes, attestBytes, sigBytes, nonce []byte, csrPublicKey crypto.PublicKey) error {
	if akPub == nil {
		return fmt.Errorf("attest: verify certify: nil AK public: %w", ErrMalformed)
	}
	ak, err := akFromPublic(akPub)
	if err != nil {
		return err
	}
	return ak.VerifyCertify(tlsPubBytes, attestBytes, sigBytes, nonce, csrPublicKey)
}

// VerifyCertify is the package's VerifyCertify for an AK from VerifyAK.
func (ak *AK) VerifyCertify(tlsPubBytes, attestBytes, sigBytes, nonce []byte, csrPublicKey crypto.PublicKey) error {
	if ak == nil || ak.key == nil {
		return fmt.Errorf("attest: verify certify: no verified AK: %w", ErrMalformed)
	}
	// Authenticate the attestation before interpreting it.
	attested, err := decodeAttest(attestBytes)
	if err != nil {
		return err
	}
	if err := verifyECDSA(ak.key, ak.hash, attested.raw, sigBytes); err != nil {
		return err
	}
	att := attested.att
	if att.Magic != tpm2.TPMGeneratedValue {
		return fmt.Errorf("attest: attestation magic %#x: %w", uint32(att.Magic), ErrMalformed)
	}
	if att.Type != tpm2.TPMSTAttestCertify {
		return fmt.Errorf("attest: attestation type %#x: %w", uint16(att.Type), ErrAttestType)
	}
	if len(nonce) < MinNonceSize || subtle.ConstantTimeCompare(att.ExtraData.Buffer, nonce) != 1 {
		return fmt.Errorf("attest: certify qualifying data: %w", ErrNonceMismatch)
	}
	info, err := att.Attested.Certify()
	if err != nil || info == nil {
		return fmt.Errorf("attest: certify info: %w", ErrMalformed)
	}

	// Residency: the certified object is the presented public area.
	tls, err := decodePublic("TLS key public", tlsPubBytes)
	if err != nil {
		return err
	}
	tlsPub := tls.pub
	if err := checkNameAlg("TLS key", tlsPub); err != nil {
		return err
	}
	if tls.name == nil || !bytes.Equal(info.Name.Buffer, tls.name) {
		return fmt.Errorf("attest: certified name is not the TLS key's: %w", ErrCertifyNameMismatch)
	}
	tlsKey, tlsParams, err := eccKey("TLS key", tlsPub, tpm2.TPMECCNistP256)
	if err != nil {
		return err
	}
	a := tlsPub.ObjectAttributes
	if !nonExportable(a) {
		return fmt.Errorf("attest: TLS key (fixedTPM=%t fixedParent=%t sensitiveDataOrigin=%t): %w",
			a.FixedTPM, a.FixedParent, a.SensitiveDataOrigin, ErrKeyExportable)
	}
	if !a.SignEncrypt || a.Decrypt || a.Restricted {
		return fmt.Errorf("attest: TLS key (sign=%t decrypt=%t restricted=%t) must be a non-restricted signing key: %w",
			a.SignEncrypt, a.Decrypt, a.Restricted, ErrKeyAttributes)
	}
	if err := tlsScheme(tlsParams); err != nil {
		return err
	}
	if err := signingOnlyParms("TLS key", tlsParams); err != nil {
		return err
	}
	if err := checkAuthorization("TLS key", tlsPub, ErrKeyPolicy); err != nil {
		return err
	}
	if err := checkQualifiedName(tls.name, info.QualifiedName.Buffer); err != nil {
		return err
	}

	// Possession: the CSR is for this key (its signature is checked by the
	// caller when it parses the CSR).
	if !tlsKey.Equal(csrPublicKey) {
		return fmt.Errorf("attest: CSR public key %T: %w", csrPublicKey, ErrCSRKeyMismatch)
	}
	return nil
}

// CertifiedFirmwareVersion returns TPMS_ATTEST.firmwareVersion of a
// certification this AK signed (VerifyCertify accepted the same bytes), and
// whether it is the TPM's firmware version. A TPM obfuscates resetCount,
// restartCount and firmwareVersion (adds a value derived from the
// hierarchy's proof and the signer's name) when the signing key is not in
// the endorsement or platform hierarchy (TPM 2.0 Part 1, "Privacy" of
// TPMS_CLOCK_INFO and firmwareVersion; Part 2, TPMS_ATTEST): the version
// is evidence only if the AK is a primary of the endorsement hierarchy or
// a child of the EK, which the attestation's qualifiedSigner shows (the
// signature covers it). ekPub is the EK's public area (EKPublicFromCert).
// For an AK elsewhere (under the SRK, as devicesdk/tpmkey creates it)
// inEndorsement is false and fw means nothing.
func (ak *AK) CertifiedFirmwareVersion(attestBytes []byte, ekPub *tpm2.TPMTPublic) (fw uint64, inEndorsement bool, err error) {
	if ak == nil || ak.Public == nil {
		return 0, false, fmt.Errorf("attest: certified firmware: no verified AK: %w", ErrMalformed)
	}
	d, err := decodeAttest(attestBytes)
	if err != nil {
		return 0, false, err
	}
	qs := d.att.QualifiedSigner.Buffer
	// A primary of the endorsement hierarchy: H(TPM_RH_ENDORSEMENT || name).
	if bytes.Equal(qs, qualifiedName(ak.Public.NameAlg, endorsementQN, ak.Name)) {
		return d.att.FirmwareVersion, true, nil
	}
	// A child of the EK: H(QN(EK) || name), QN(EK) = H(TPM_RH_ENDORSEMENT || name(EK)).
	if ekPub != nil {
		if ekName, err := Name(ekPub); err == nil {
			ekQN := qualifiedName(ekPub.NameAlg, endorsementQN, ekName)
			if ekQN != nil && bytes.Equal(qs, qualifiedName(ak.Public.NameAlg, ekQN, ak.Name)) {
				return d.att.FirmwareVersion, true, nil
			}
		}
	}
	return d.att.FirmwareVersion, false, nil
}

// endorsementQN is the qualified name of the endorsement hierarchy: its
// handle.
var endorsementQN = binary.BigEndian.AppendUint32(nil, uint32(tpm2.TPMRHEndorsement))

// qualifiedName is nameAlg || H_nameAlg(parentQN || name) (Part 1, 16.6);
// the qualified name of a hierarchy is its handle (4 bytes). Nil for a hash
// this package refuses.
func qualifiedName(alg tpm2.TPMIAlgHash, parentQN, name []byte) []byte {
	newHash, _, ok := hashFor(alg)
	if !ok {
		return nil
	}
	h := newHash()
	h.Write(parentQN)
	h.Write(name)
	qn := make([]byte, 2, 2+h.Size())
	binary.BigEndian.PutUint16(qn, uint16(alg))
	return h.Sum(qn)
}

// tlsScheme accepts the TLS key's signing scheme: NULL (the signer names
// the scheme per signature) or ECDSA with SHA-256, the hash of its P-256
// curve and of the certificate profile's ecdsa-with-SHA256.
func tlsScheme(params *tpm2.TPMSECCParms) error {
	switch params.Scheme.Scheme {
	case tpm2.TPMAlgNull:
		return nil
	case tpm2.TPMAlgECDSA:
		d, err := params.Scheme.Details.ECDSA()
		if err != nil || d == nil {
			return fmt.Errorf("attest: TLS key ECDSA scheme details: %w", ErrMalformed)
		}
		if d.HashAlg != tpm2.TPMAlgSHA256 {
			return fmt.Errorf("attest: TLS key scheme ECDSA with hash %#x, want SHA-256: %w", uint16(d.HashAlg), ErrKeyType)
		}
		return nil
	}
	return fmt.Errorf("attest: TLS key scheme %#x, want ECDSA-SHA256 or NULL: %w", uint16(params.Scheme.Scheme), ErrKeyType)
}

type decodedAttest struct {
	att *tpm2.TPMSAttest
	raw []byte // the signed TPMS_ATTEST bytes
}

func decodeAttest(b []byte) (*decodedAttest, error) {
	if d, ok := decodeCertifyAttest(b); ok { // attestfast.go
		return d, nil
	}
	return decodeAttestReflect(b)
}

// decodeAttestReflect is decodeAttest through go-tpm's decoder, for
// every structure decodeCertifyAttest does not take (and its errors).
func decodeAttestReflect(b []byte) (*decodedAttest, error) {
	var d decodedAttest
	err := safely("TPM2B_ATTEST", func() error {
		a2b, err := tpm2.Unmarshal[tpm2.TPM2BAttest](b)
		if err != nil {
			return err
		}
		if a2b == nil {
			return errors.New("nil TPM2B_ATTEST")
		}
		d.raw = a2b.Bytes()
		if len(d.raw) == 0 || len(b) != 2+len(d.raw) {
			return errors.New("TPM2B_ATTEST size does not match its contents")
		}
		d.att, err = a2b.Contents()
		if err != nil {
			return err
		}
		if d.att == nil {
			return errors.New("nil TPMS_ATTEST")
		}
		if !bytes.Equal(tpm2.Marshal(*d.att), d.raw) {
			return errNotCanonical
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrMalformed) {
			return nil, err
		}
		return nil, fmt.Errorf("attest: decode TPM2B_ATTEST: %w: %w", ErrMalformed, err)
	}
	return &d, nil
}

// decodeECDSASignatureReflect decodes an ECDSA TPMT_SIGNATURE through
// go-tpm, for every signature decodeECDSASignature does not take (and its
// errors). The caller recovers go-tpm's panics (safely).
func decodeECDSASignatureReflect(b []byte) (*tpm2.TPMSSignatureECC, error) {
	sig, err := tpm2.Unmarshal[tpm2.TPMTSignature](b)
	if err != nil {
		return nil, err
	}
	if sig == nil {
		return nil, errors.New("nil TPMT_SIGNATURE")
	}
	if !bytes.Equal(tpm2.Marshal(*sig), b) {
		return nil, errNotCanonical
	}
	if sig.SigAlg != tpm2.TPMAlgECDSA {
		return nil, fmt.Errorf("signature algorithm %#x, want ECDSA: %w", uint16(sig.SigAlg), ErrCertifySignature)
	}
	ecc, err := sig.Signature.ECDSA()
	if err != nil || ecc == nil {
		return nil, errors.New("no ECDSA signature")
	}
	return ecc, nil
}

// verifyECDSA checks a TPMT_SIGNATURE by key over msg hashed with hashAlg
// (the AK's scheme hash; a signature naming another hash is refused).
func verifyECDSA(key *ecdsa.PublicKey, hashAlg tpm2.TPMIAlgHash, msg, sigBytes []byte) error {
	var r, s *big.Int
	err := safely("TPMT_SIGNATURE", func() error {
		ecc, ok := decodeECDSASignature(sigBytes) // attestfast.go
		if !ok {
			var err error
			if ecc, err = decodeECDSASignatureReflect(sigBytes); err != nil {
				return err
			}
		}
		if ecc.Hash != hashAlg {
			return fmt.Errorf("signature hash %#x, want the AK's %#x: %w", uint16(ecc.Hash), uint16(hashAlg), ErrCertifySignature)
		}
		// A TPM writes R and S at exactly the curve's size (leading
		// zeros kept); any other length is another encoding of the same
		// signature, and is refused. This does not make signatures
		// unique: ECDSA is malleable, (r, n−s) verifies whenever (r, s)
		// does, and TPMs do not produce low-S signatures, so none is
		// required. Nothing here relies on a signature being unique: the
		// certification is bound to its one-time challenge nonce (the
		// challenge is consumed by round 2), not to its signature bytes.
		size := (key.Curve.Params().BitSize + 7) / 8
		if len(ecc.SignatureR.Buffer) != size || len(ecc.SignatureS.Buffer) != size {
			return fmt.Errorf("signature R and S are %d and %d bytes, want %d: %w",
				len(ecc.SignatureR.Buffer), len(ecc.SignatureS.Buffer), size, ErrCertifySignature)
		}
		r = new(big.Int).SetBytes(ecc.SignatureR.Buffer)
		s = new(big.Int).SetBytes(ecc.SignatureS.Buffer)
		return nil
	})
	if err != nil {
		if errors.Is(err, ErrMalformed) || errors.Is(err, ErrCertifySignature) {
			return fmt.Errorf("attest: certify signature: %w", err)
		}
		return fmt.Errorf("attest: decode TPMT_SIGNATURE: %w: %w", ErrMalformed, err)
	}
	newHash, _, _ := hashFor(hashAlg)
	h := newHash()
	h.Write(msg)
	if !ecdsa.Verify(key, h.Sum(nil), r, s) {
		return fmt.Errorf("attest: certify signature does not verify with the AK: %w", ErrCertifySignature)
	}
	return nil
}
