package attest

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// MaxEKCertSize bounds the EK certificate this package parses. Real EK
// certificates are 1-2 KiB.
const MaxEKCertSize = 16 << 10

// OIDs from the TCG EK Credential Profile 2.3 (section 3.2) and X.509.
var (
	oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}
	// tcg-kp-EKCertificate, the EK certificate's extended key usage.
	oidTCGKpEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	// tcg-at-tpmManufacturer, tcg-at-tpmModel, tcg-at-tpmVersion: the
	// directoryName attributes of the EK certificate's subjectAltName.
	oidTPMManufacturer = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	oidTPMModel        = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	oidTPMVersion      = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	// tcg-at, the arc of TCG attribute types.
	oidTCGAttributeArc = asn1.ObjectIdentifier{2, 23, 133, 2}
)

// TPMInfo is the TPM identification an EK certificate carries in its
// subjectAltName directoryName (TCG EK Credential Profile 2.3, 3.2.9).
type TPMInfo struct {
	// Manufacturer is tcg-at-tpmManufacturer, e.g. "id:00001014" (IBM).
	Manufacturer string
	// Model is tcg-at-tpmModel, e.g. "swtpm".
	Model string
	// Version is tcg-at-tpmVersion, the firmware version, e.g. "id:20191023".
	Version string
}

// VerifyEKCertificate parses an EK certificate and verifies that it chains
// to roots (the configured TPM manufacturer roots) at time now. It returns the
// certificate: its public key is the EK public key the server uses for
// MakeCredential. roots must not be nil (nil would mean the system roots).
//
// Before the chain, the certificate must be an EK certificate
// (CheckEKProfile: key usage, extended key usage and the TCG
// subjectAltName), not a CA, and its key must have an EK template. EK
// certificates do not pass crypto/x509's Verify as they are, and two things
// are handled deliberately rather than by switching checks off:
//   - the subjectAltName holds only a directoryName with the TPM
//     manufacturer, model and version attributes (Profile 3.2.9), which Go
//     leaves unhandled when it is critical. It is parsed from its bytes and
//     checked in every case, and only then is that one OID removed from
//     UnhandledCriticalExtensions; any other unhandled critical extension
//     still fails verification.
//   - the extended key usage is tcg-kp-EKCertificate (Profile 3.2.16), which
//     Go does not know. If the extension is present it must be exactly that
//     OID; the chain is then verified with ExtKeyUsageAny.
func VerifyEKCertificate(ekDER []byte, roots *x509.CertPool, now time.Time) (*x509.Certificate, error) {
	return VerifyEKCertificateWithIntermediates(ekDER, roots, nil, now)
}

// VerifyEKCertificateWithIntermediates is VerifyEKCertificate for
// manufacturers that issue EK certificates from intermediate CAs.
func VerifyEKCertificateWithIntermediates(ekDER []byte, roots, intermediates *x509.CertPool, now time.Time) (*x509.Certificate, error) {
	cert, _, err := verifyEK(ekDER, roots, intermediates, now)
	return cert, err
}

// verifyEK is VerifyEKCertificateWithIntermediates that also returns the
// verified chains.
func verifyEK(ekDER []byte, roots, intermediates *x509.CertPool, now time.Time) (*x509.Certificate, [][]*x509.Certificate, error) {
	if roots == nil {
		return nil, nil, fmt.Errorf("attest: verify EK certificate: no manufacturer roots configured: %w", ErrEKChainInvalid)
	}
	cert, _, err := parseEK(ekDER)
	if err != nil {
		return nil, nil, err
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		CurrentTime:   now,
		// tcg-kp-EKCertificate was checked above; Go cannot express it.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("attest: verify EK certificate: %w: %w", ErrEKChainInvalid, err)
	}
	return cert, chains, nil
}

// ParseEKCertificate parses an EK certificate without verifying its chain
// (the allowlist policy without manufacturer roots, where the registration is
// the trust) and checks everything else VerifyEKCertificate checks: it is
// not a CA, it is an EK certificate by the TCG EK Credential Profile
// (CheckEKProfile), and its key has an EK template. It returns the TPM
// identification from the subjectAltName.
func ParseEKCertificate(der []byte) (*x509.Certificate, TPMInfo, error) {
	return parseEK(der)
}

// parseEK is ParseEKCertificate. The returned certificate has the TCG
// subjectAltName removed from UnhandledCriticalExtensions (it was checked
// here), so that crypto/x509's Verify does not refuse it.
func parseEK(der []byte) (*x509.Certificate, TPMInfo, error) {
	if len(der) == 0 || len(der) > MaxEKCertSize {
		return nil, TPMInfo{}, fmt.Errorf("attest: EK certificate is %d bytes: %w: %w", len(der), ErrEKCertMalformed, ErrMalformed)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, TPMInfo{}, fmt.Errorf("attest: parse EK certificate: %w: %w: %w", ErrEKCertMalformed, ErrMalformed, err)
	}
	if cert.IsCA {
		return nil, TPMInfo{}, fmt.Errorf("attest: EK certificate is a CA certificate: %w", ErrEKChainInvalid)
	}
	if _, err := EKPublicFromCert(cert); err != nil {
		return nil, TPMInfo{}, err
	}
	info, err := CheckEKProfile(cert)
	if err != nil {
		return nil, TPMInfo{}, err
	}
	if i := slices.IndexFunc(cert.UnhandledCriticalExtensions, oidSubjectAltName.Equal); i >= 0 {
		cert.UnhandledCriticalExtensions = slices.Delete(slices.Clone(cert.UnhandledCriticalExtensions), i, i+1)
	}
	return cert, info, nil
}

// signingKeyUsages are the key usages an EK never has: an EK is a
// decryption key (TPM 2.0 Part 1, 11.4.7), it cannot sign.
const signingKeyUsages = x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment |
	x509.KeyUsageCertSign | x509.KeyUsageCRLSign

// CheckEKProfile checks that cert is an EK certificate as the TCG EK
// Credential Profile 2.3 (section 3.2) defines one, whatever it chains to,
// and returns the TPM identification it carries:
//   - key usage (3.2.8) present, with keyEncipherment for an RSA EK and
//     keyAgreement for an ECC EK, and no signing usage (digitalSignature,
//     nonRepudiation, keyCertSign, cRLSign);
//   - extended key usage (3.2.16), if present, exactly tcg-kp-EKCertificate;
//   - subjectAltName (3.2.9) present, critical or not, holding only
//     directoryNames of TCG attributes with the TPM manufacturer, model and
//     version (EKTPMInfo, which parses the extension's bytes itself rather
//     than trusting what crypto/x509 parsed or marked handled).
//
// Failures wrap ErrEKKeyUsage, ErrEKEKU or ErrEKSAN, each together with
// ErrEKChainInvalid.
func CheckEKProfile(cert *x509.Certificate) (TPMInfo, error) {
	ku := cert.KeyUsage
	var need x509.KeyUsage
	switch cert.PublicKey.(type) {
	case *rsa.PublicKey:
		need = x509.KeyUsageKeyEncipherment
	case *ecdsa.PublicKey:
		need = x509.KeyUsageKeyAgreement
	default:
		return TPMInfo{}, fmt.Errorf("attest: EK key type %T: %w", cert.PublicKey, ErrKeyType)
	}
	if ku&need == 0 || ku&signingKeyUsages != 0 {
		return TPMInfo{}, fmt.Errorf("attest: EK certificate key usage %#x, want %#x and no signing usage: %w: %w",
			int(ku), int(need), ErrEKKeyUsage, ErrEKChainInvalid)
	}
	if len(cert.ExtKeyUsage) > 0 || len(cert.UnknownExtKeyUsage) > 0 {
		if len(cert.ExtKeyUsage) > 0 || !slices.ContainsFunc(cert.UnknownExtKeyUsage, oidTCGKpEKCertificate.Equal) ||
			slices.ContainsFunc(cert.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return !o.Equal(oidTCGKpEKCertificate) }) {
			return TPMInfo{}, fmt.Errorf("attest: EK certificate extended key usage is not exactly tcg-kp-EKCertificate: %w: %w", ErrEKEKU, ErrEKChainInvalid)
		}
	}
	return EKTPMInfo(cert)
}

// EKTPMInfo parses the TPM identification from an EK certificate's
// subjectAltName, from the extension's bytes. It fails with ErrEKSAN (and
// ErrEKChainInvalid) if the subjectAltName is absent, repeated, or holds
// anything but directoryNames of TCG attributes, or lacks the manufacturer,
// model or version.
func EKTPMInfo(cert *x509.Certificate) (TPMInfo, error) {
	var info TPMInfo
	isSAN := func(e pkix.Extension) bool { return e.Id.Equal(oidSubjectAltName) }
	idx := slices.IndexFunc(cert.Extensions, isSAN)
	if idx < 0 {
		return info, fmt.Errorf("attest: EK certificate has no subjectAltName: %w: %w", ErrEKSAN, ErrEKChainInvalid)
	}
	bad := func(why string) (TPMInfo, error) {
		return TPMInfo{}, fmt.Errorf("attest: EK certificate subjectAltName %s: %w: %w", why, ErrEKSAN, ErrEKChainInvalid)
	}
	if slices.ContainsFunc(cert.Extensions[idx+1:], isSAN) {
		return bad("is repeated")
	}
	var names asn1.RawValue
	if rest, err := asn1.Unmarshal(cert.Extensions[idx].Value, &names); err != nil || len(rest) > 0 ||
		names.Class != asn1.ClassUniversal || names.Tag != asn1.TagSequence || !names.IsCompound {
		return bad("is not a GeneralNames SEQUENCE")
	}
	seen := map[string]*string{
		oidTPMManufacturer.String(): &info.Manufacturer,
		oidTPMModel.String():        &info.Model,
		oidTPMVersion.String():      &info.Version,
	}
	for rest := names.Bytes; len(rest) > 0; {
		var gn asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &gn); err != nil {
			return bad("has a malformed GeneralName")
		}
		// directoryName [4] Name, explicitly tagged (RFC 5280, 4.2.1.6).
		if gn.Class != asn1.ClassContextSpecific || gn.Tag != 4 || !gn.IsCompound {
			return bad("holds a name other than a directoryName")
		}
		var rdns pkix.RDNSequence
		if r, err := asn1.Unmarshal(gn.Bytes, &rdns); err != nil || len(r) > 0 {
			return bad("holds a malformed directoryName")
		}
		for _, rdn := range rdns {
			for _, atv := range rdn {
				if !isUnderArc(atv.Type, oidTCGAttributeArc) {
					return bad("holds a non-TCG attribute " + atv.Type.String())
				}
				dst, ok := seen[atv.Type.String()]
				if !ok {
					continue
				}
				s, isString := atv.Value.(string)
				if !isString || s == "" || *dst != "" {
					return bad("has an empty, non-string or repeated " + atv.Type.String())
				}
				*dst = s
			}
		}
	}
	if info.Manufacturer == "" || info.Model == "" || info.Version == "" {
		return bad("lacks TPM manufacturer, model or version")
	}
	return info, nil
}

func isUnderArc(oid, arc asn1.ObjectIdentifier) bool {
	return len(oid) > len(arc) && slices.Equal(oid[:len(arc)], arc)
}

// EKPublicFromCert returns the public area of the EK whose key is in cert:
// the standard EK template that key type is created from (TCG EK Credential
// Profile 2.3, B.3) with the certificate's key as unique field. Its name is
// the EK's name in the TPM, and it is what MakeCredential encrypts to.
// Supported: RSA 2048 (template L-1), ECC NIST P-256 (L-2), ECC NIST P-384
// (H-3, swtpm's ECC EK).
func EKPublicFromCert(cert *x509.Certificate) (*tpm2.TPMTPublic, error) {
	switch k := cert.PublicKey.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() != 2048 || k.E != 65537 {
			return nil, fmt.Errorf("attest: EK is RSA %d-bit, e=%d: %w", k.N.BitLen(), k.E, ErrKeyType)
		}
		pub := tpm2.RSAEKTemplate
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: k.N.FillBytes(make([]byte, 256))})
		return &pub, nil
	case *ecdsa.PublicKey:
		var pub tpm2.TPMTPublic
		var size int
		switch k.Curve {
		case elliptic.P256():
			pub, size = tpm2.ECCEKTemplate, 32
		case elliptic.P384():
			pub, size = eccP384EKTemplate(), 48
		default:
			return nil, fmt.Errorf("attest: EK curve %s: %w", k.Curve.Params().Name, ErrKeyType)
		}
		pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, size))},
			Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, size))},
		})
		return &pub, nil
	default:
		return nil, fmt.Errorf("attest: EK key type %T: %w", cert.PublicKey, ErrKeyType)
	}
}

// policyBSHA384 is the authPolicy of the high-range SHA-384 EK templates
// (TCG EK Credential Profile 2.3, B.6).
var policyBSHA384 = []byte{
	0xB2, 0x6E, 0x7D, 0x28, 0xD1, 0x1A, 0x50, 0xBC, 0x53, 0xD8, 0x82, 0xBC,
	0xF5, 0xFD, 0x3A, 0x1A, 0x07, 0x41, 0x48, 0xBB, 0x35, 0xD3, 0xB4, 0xE4,
	0xCB, 0x1C, 0x0A, 0xD9, 0xBD, 0xE4, 0x19, 0xCA, 0xCB, 0x47, 0xBA, 0x09,
	0x69, 0x96, 0x46, 0x15, 0x0F, 0x9F, 0xC0, 0x00, 0xF3, 0xF8, 0x0E, 0x12,
}

// eccP384EKTemplate is the high-range ECC NIST P-384 EK template (H-3).
// It mirrors devicesdk/tpmkey, which the device uses to recreate the EK; the
// swtpm tests check that both yield the TPM's EK name.
func eccP384EKTemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgECC,
		NameAlg: tpm2.TPMAlgSHA384,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:            true,
			FixedParent:         true,
			SensitiveDataOrigin: true,
			UserWithAuth:        true,
			AdminWithPolicy:     true,
			Restricted:          true,
			Decrypt:             true,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: bytes.Clone(policyBSHA384)},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{
				Algorithm: tpm2.TPMAlgAES,
				KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
				Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
			},
			Scheme:  tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID: tpm2.TPMECCNistP384,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

var errNotCanonical = errors.New("not canonically encoded")
