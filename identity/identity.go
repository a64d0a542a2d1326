// Package identity is the one place that knows what a fleetgate identity is:
// the device ID rules, the SPIFFE-style URI SAN that carries an identity in a
// certificate, and the mapping between the two. Both enroll and broker use it;
// nothing else parses identities out of certificates.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// Role is the kind of principal a certificate identifies.
type Role string

// Roles, as they appear in the URI SAN path.
const (
	RoleDevice   Role = "device"
	RoleService  Role = "service"
	RoleOperator Role = "operator"
)

// MaxNameLen is the longest device ID, service or operator name.
const MaxNameLen = 64

// Sentinel errors. Callers test them with errors.Is.
var (
	// ErrInvalidName: a device ID or name breaks the rules of ValidateName.
	ErrInvalidName = errors.New("identity: invalid name")
	// ErrNoIdentity: the certificate carries no fleetgate URI SAN.
	ErrNoIdentity = errors.New("identity: certificate carries no fleetgate identity")
	// ErrAmbiguous: the certificate carries more than one URI SAN.
	ErrAmbiguous = errors.New("identity: certificate carries more than one URI SAN")
	// ErrForeignTrustDomain: the URI SAN names another trust domain.
	ErrForeignTrustDomain = errors.New("identity: foreign trust domain")
	// ErrMalformedURI: the URI SAN is not spiffe://<td>/<role>/<name>.
	ErrMalformedURI = errors.New("identity: malformed identity URI")
)

// Identity is a verified principal: its role and its name (device ID for
// devices).
type Identity struct {
	Role Role
	Name string
}

// String returns "role/name".
func (id Identity) String() string { return string(id.Role) + "/" + id.Name }

// URI returns the SPIFFE URI of id in trust domain td.
func (id Identity) URI(td string) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: td, Path: "/" + string(id.Role) + "/" + id.Name}
}

// ValidateName checks a device ID (or service/operator name): 1–64 characters
// of [a-z0-9-], starting with a letter or digit. Such a name is safe inside an
// MQTT topic level by construction: it cannot hold '/', '+', '#', '$' or NUL.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrInvalidName)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%w: %d characters, at most %d", ErrInvalidName, len(name), MaxNameLen)
	}
	if name[0] == '-' {
		return fmt.Errorf("%w: %q starts with '-'", ErrInvalidName, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' {
			continue
		}
		return fmt.Errorf("%w: %q has %q at %d (allowed: a-z 0-9 -)", ErrInvalidName, name, c, i)
	}
	return nil
}

// ValidateTrustDomain checks a trust domain name (a DNS-like label sequence).
func ValidateTrustDomain(td string) error {
	if td == "" || len(td) > 255 {
		return fmt.Errorf("identity: trust domain %q: must be 1-255 characters", td)
	}
	for i := 0; i < len(td); i++ {
		c := td[i]
		if (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' {
			continue
		}
		return fmt.Errorf("identity: trust domain %q: character %q not allowed", td, c)
	}
	return nil
}

// New returns a validated identity.
func New(role Role, name string) (Identity, error) {
	switch role {
	case RoleDevice, RoleService, RoleOperator:
	default:
		return Identity{}, fmt.Errorf("%w: unknown role %q", ErrMalformedURI, role)
	}
	if err := ValidateName(name); err != nil {
		return Identity{}, err
	}
	return Identity{Role: role, Name: name}, nil
}

// ParseURI parses spiffe://<td>/<role>/<name> and checks it belongs to td.
func ParseURI(u *url.URL, td string) (Identity, error) {
	if u == nil || u.Scheme != "spiffe" || u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" || u.Port() != "" {
		return Identity{}, ErrMalformedURI
	}
	if u.Host != td {
		return Identity{}, fmt.Errorf("%w: %q", ErrForeignTrustDomain, u.Host)
	}
	rest, ok := strings.CutPrefix(u.Path, "/")
	if !ok {
		return Identity{}, ErrMalformedURI
	}
	role, name, ok := strings.Cut(rest, "/")
	if !ok {
		return Identity{}, ErrMalformedURI
	}
	return New(Role(role), name)
}

// FromCertificate returns the identity a verified certificate carries: exactly
// one URI SAN in trust domain td. The caller must have verified the chain.
func FromCertificate(cert *x509.Certificate, td string) (Identity, error) {
	if cert == nil {
		return Identity{}, ErrNoIdentity
	}
	switch len(cert.URIs) {
	case 0:
		return Identity{}, ErrNoIdentity
	case 1:
	default:
		return Identity{}, ErrAmbiguous
	}
	return ParseURI(cert.URIs[0], td)
}
