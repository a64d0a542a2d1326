package attest

import (
	"bytes"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/fleetgate/fleetgate/internal/logguard"
)

// A DenyList refuses TPMs by manufacturer, model and firmware version.
// Operators use it for TPM models or firmware with known flaws. It is read
// from a YAML file at server start (LoadDenyList):
//
//	deny:
//	  - name: Infineon RSALib (CVE-2017-15361)   # optional, shown in refusals
//	    manufacturer: id:49465800                # required
//	    model: SLB9670                           # optional: every model
//	    versions: [id:00070002]                  # optional
//	    versions_below: id:0007003E              # optional
//
// A rule matches a TPM whose manufacturer (and model, if given) equal the
// rule's, compared case-insensitively, and whose version is one of versions
// or below versions_below. A rule without versions and versions_below
// matches every version. Versions are TCG version numbers, "id:" and 1 to 8
// hex digits (TPM_PT_FIRMWARE_VERSION_1, the firmware version's upper 32
// bits), compared as numbers: id:70002 is id:00070002.
//
// Two sources are judged, and either matching refuses:
//
//   - At round 1 (CheckEK), the EK certificate's identification (TCG EK
//     Credential Profile 2.3, 3.2.9: tcg-at-tpmManufacturer, tpmModel,
//     tpmVersion). Its version is the firmware at manufacture, certified by
//     the manufacturer; a TPM whose certificate version is not a TCG version
//     number matches every rule with versions or versions_below (deny by
//     default).
//   - At round 2 (CheckFirmware), the firmware version the TPM signs into
//     the TPM2_Certify attestation (TPMS_ATTEST.firmwareVersion, bound to
//     the challenge by its nonce and to the EK by credential activation):
//     the firmware running now, which may have been updated or downgraded
//     since manufacture. Its upper 32 bits are compared with versions and
//     versions_below of the rules whose manufacturer and model match the
//     EK certificate's. A TPM whose firmware matches is refused with
//     ErrFirmwareDenied.
//
// Independently of any list, CheckEK refuses an RSA EK whose modulus has the
// ROCA structure (ROCAVulnerable): its private key can be computed.
//
// A nil *DenyList holds no rules. A DenyList is immutable once parsed and
// safe for concurrent use.
type DenyList struct {
	Rules []DenyRule `yaml:"deny"`
}

// ErrFirmwareDenied means the firmware version the TPM signed into its
// certification matches a deny-list rule.
var ErrFirmwareDenied = errors.New("attest: TPM firmware is on the deny-list")

// DenyRule is one rule of a DenyList.
type DenyRule struct {
	// Name labels the rule in refusals and in `fleetgate tpm check`; it
	// defaults to "rule N" (1-based).
	Name          string   `yaml:"name"`
	Manufacturer  string   `yaml:"manufacturer"`
	Model         string   `yaml:"model"`
	Versions      []string `yaml:"versions"`
	VersionsBelow string   `yaml:"versions_below"`

	below    uint64
	hasBelow bool
	versions []uint64
}

// MaxDenyListSize bounds a deny-list file.
const MaxDenyListSize = 1 << 20

// LoadDenyList reads and parses a deny-list file (ParseDenyList).
func LoadDenyList(path string) (*DenyList, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("TPM deny-list: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxDenyListSize+1))
	if err != nil {
		return nil, fmt.Errorf("TPM deny-list %s: %w", path, err)
	}
	if len(b) > MaxDenyListSize {
		return nil, fmt.Errorf("TPM deny-list %s: larger than %d bytes", path, MaxDenyListSize)
	}
	l, err := ParseDenyList(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return l, nil
}

// ParseDenyList parses a deny-list (one YAML document, see DenyList).
// Unknown fields, a rule without manufacturer, empty strings and malformed
// version bounds are refused, every problem in one error. An empty document
// is an empty list.
func ParseDenyList(b []byte) (*DenyList, error) {
	l := &DenyList{}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(l); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("TPM deny-list: %w", err)
	}
	var extra any
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("TPM deny-list: the file must hold one YAML document")
	}
	var errs []error
	for i := range l.Rules {
		r := &l.Rules[i]
		where := fmt.Sprintf("TPM deny-list: rule %d", i+1)
		if r.Name == "" {
			r.Name = fmt.Sprintf("rule %d", i+1)
		} else {
			where += fmt.Sprintf(" (%s)", r.Name)
		}
		if strings.TrimSpace(r.Manufacturer) == "" {
			errs = append(errs, fmt.Errorf("%s: manufacturer is required (e.g. id:49465800)", where))
		}
		if r.Model != "" && strings.TrimSpace(r.Model) == "" {
			errs = append(errs, fmt.Errorf("%s: model is blank", where))
		}
		r.versions = nil
		for _, v := range r.Versions {
			n, ok := parseTCGVersion(v)
			if !ok {
				errs = append(errs, fmt.Errorf("%s: versions holds %q, not a TCG version (id: and 1-8 hex digits)", where, v))
				continue
			}
			r.versions = append(r.versions, n)
		}
		if r.VersionsBelow != "" {
			v, ok := parseTCGVersion(r.VersionsBelow)
			if !ok {
				errs = append(errs, fmt.Errorf("%s: versions_below %q is not a TCG version (id: and 1-8 hex digits)", where, r.VersionsBelow))
			}
			r.below, r.hasBelow = v, ok
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return l, nil
}

// parseTCGVersion parses "id:" followed by 1-8 hex digits.
func parseTCGVersion(s string) (uint64, bool) {
	h, ok := strings.CutPrefix(strings.ToLower(strings.TrimSpace(s)), "id:")
	if !ok || len(h) == 0 || len(h) > 8 {
		return 0, false
	}
	v, err := strconv.ParseUint(h, 16, 32)
	return v, err == nil
}

// identifies reports whether r's manufacturer and model match info's.
func (r *DenyRule) identifies(info TPMInfo) bool {
	if !strings.EqualFold(strings.TrimSpace(r.Manufacturer), strings.TrimSpace(info.Manufacturer)) {
		return false
	}
	return r.Model == "" || strings.EqualFold(strings.TrimSpace(r.Model), strings.TrimSpace(info.Model))
}

// hasVersions reports whether r names versions (versions or
// versions_below).
func (r *DenyRule) hasVersions() bool { return len(r.versions) > 0 || r.hasBelow }

// matchesVersion reports whether the version number v is denied by r.
func (r *DenyRule) matchesVersion(v uint64) bool {
	return slices.Contains(r.versions, v) || (r.hasBelow && v < r.below)
}

func (r *DenyRule) matches(info TPMInfo) bool {
	if !r.identifies(info) {
		return false
	}
	if !r.hasVersions() {
		return true
	}
	v, ok := parseTCGVersion(info.Version)
	return !ok || r.matchesVersion(v)
}

// Match returns the first rule that matches info, or nil.
func (l *DenyList) Match(info TPMInfo) *DenyRule {
	if l == nil {
		return nil
	}
	for i := range l.Rules {
		if l.Rules[i].matches(info) {
			return &l.Rules[i]
		}
	}
	return nil
}

// CheckEK refuses the TPM of a verified EK certificate (one that passed
// VerifyEKCertificate or ParseEKCertificate) with ErrEKROCA if its RSA
// modulus is ROCA-vulnerable, and with ErrEKDenied, returning the rule, if
// its TPM identification matches a rule. l may be nil.
func (l *DenyList) CheckEK(cert *x509.Certificate) (*DenyRule, error) {
	if k, ok := cert.PublicKey.(*rsa.PublicKey); ok && ROCAVulnerable(k.N) {
		return nil, fmt.Errorf("attest: EK modulus has the ROCA fingerprint: %w", ErrEKROCA)
	}
	if l == nil || len(l.Rules) == 0 {
		return nil, nil
	}
	info, err := EKTPMInfo(cert)
	if err != nil {
		return nil, err
	}
	if r := l.Match(info); r != nil {
		// The attributes come from the certificate: bounded and escaped
		// for the audit record and the log.
		return r, fmt.Errorf("attest: TPM %s model %s version %s matches deny-list rule %q: %w",
			logguard.Clip(info.Manufacturer, 64), logguard.Clip(info.Model, 64), logguard.Clip(info.Version, 64), r.Name, ErrEKDenied)
	}
	return nil, nil
}

// FirmwareVersion1 is the TCG version number of a TPMS_ATTEST
// firmwareVersion: its upper 32 bits, TPM_PT_FIRMWARE_VERSION_1, the value
// an EK certificate's tcg-at-tpmVersion carries.
func FirmwareVersion1(firmware uint64) uint64 { return firmware >> 32 }

// CheckFirmware refuses, with ErrFirmwareDenied and the rule, a TPM
// identified by info (its EK certificate's) whose signed firmware version
// (TPMS_ATTEST.firmwareVersion of a verified certification, see
// CertifiedFirmwareVersion) matches a rule with versions or
// versions_below. Rules without versions refuse at CheckEK already. l may
// be nil.
func (l *DenyList) CheckFirmware(info TPMInfo, firmware uint64) (*DenyRule, error) {
	if l == nil {
		return nil, nil
	}
	v := FirmwareVersion1(firmware)
	for i := range l.Rules {
		r := &l.Rules[i]
		if r.hasVersions() && r.identifies(info) && r.matchesVersion(v) {
			return r, fmt.Errorf("attest: TPM %s model %s runs firmware id:%08X (signed firmwareVersion %#016x), which matches deny-list rule %q: %w",
				logguard.Clip(info.Manufacturer, 64), logguard.Clip(info.Model, 64), v, firmware, r.Name, ErrFirmwareDenied)
		}
	}
	return nil, nil
}

// rocaPrimes are the small primes of the ROCA fingerprint (Nemec, Sys,
// Svenda, Klinec, Matyas: "The Return of Coppersmith's Attack", CCS 2017).
var rocaPrimes = []int64{3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
	97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167}

// rocaSubgroups[i][x] reports whether x is in the subgroup of Z*_r that
// 65537 generates, r = rocaPrimes[i].
var rocaSubgroups = func() [][]bool {
	out := make([][]bool, len(rocaPrimes))
	for i, r := range rocaPrimes {
		in := make([]bool, r)
		for x := int64(1); !in[x]; x = x * 65537 % r {
			in[x] = true
		}
		out[i] = in
	}
	return out
}()

// ROCAVulnerable reports whether an RSA modulus has the fingerprint of the
// Infineon RSALib keys of CVE-2017-15361 (ROCA). Their primes are
// p = k*M + (65537^a mod M), M the product of the first primes, so for each
// small prime r dividing M, N mod r = 65537^(a+b) mod r lies in the subgroup
// generated by 65537. A random modulus passes all 38 tests with negligible
// probability.
func ROCAVulnerable(n *big.Int) bool {
	if n == nil || n.Sign() <= 0 {
		return false
	}
	var m, r big.Int
	for i, p := range rocaPrimes {
		r.SetInt64(p)
		m.Mod(n, &r)
		if !rocaSubgroups[i][m.Int64()] {
			return false
		}
	}
	return true
}
