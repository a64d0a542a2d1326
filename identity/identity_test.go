package identity

import (
	"crypto/x509"
	"errors"
	"net/url"
	"strings"
	"testing"
)

func TestValidateName(t *testing.T) {
	cases := []struct {
		name string
		in   string
		ok   bool
	}{
		{"a plain lower-case ID is valid", "sensor-1", true},
		{"a single digit is valid", "7", true},
		{"64 characters are valid", strings.Repeat("a", 64), true},
		{"65 characters are too long", strings.Repeat("a", 65), false},
		{"empty is refused", "", false},
		{"a leading dash is refused", "-x", false},
		{"upper case is refused", "Sensor", false},
		{"a slash could split a topic level", "a/b", false},
		{"a plus is an MQTT wildcard", "a+b", false},
		{"a hash is an MQTT wildcard", "a#", false},
		{"a dollar could reach $SYS", "$SYS", false},
		{"NUL is refused", "a\x00b", false},
		{"non-ASCII is refused", "sénsor", false},
		{"an underscore is refused", "a_b", false},
		{"a dot is refused", "a.b", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateName(tc.in)
			if (err == nil) != tc.ok {
				t.Fatalf("ValidateName(%q) = %v, want ok=%v", tc.in, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidName) {
				t.Fatalf("error %v is not ErrInvalidName", err)
			}
		})
	}
}

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

func TestFromCertificate(t *testing.T) {
	const td = "example.org"
	cases := []struct {
		name string
		uris []string
		want Identity
		err  error
	}{
		{"a device URI yields the device", []string{"spiffe://example.org/device/d-1"}, Identity{RoleDevice, "d-1"}, nil},
		{"a service URI yields the service", []string{"spiffe://example.org/service/backend"}, Identity{RoleService, "backend"}, nil},
		{"an operator URI yields the operator", []string{"spiffe://example.org/operator/admin"}, Identity{RoleOperator, "admin"}, nil},
		{"no URI SAN is refused", nil, Identity{}, ErrNoIdentity},
		{"two URI SANs are refused", []string{"spiffe://example.org/device/a", "spiffe://example.org/device/b"}, Identity{}, ErrAmbiguous},
		{"another trust domain is refused", []string{"spiffe://evil.org/device/d-1"}, Identity{}, ErrForeignTrustDomain},
		{"an unknown role is refused", []string{"spiffe://example.org/admin/root"}, Identity{}, ErrMalformedURI},
		{"an extra path level is refused", []string{"spiffe://example.org/device/a/b"}, Identity{}, ErrInvalidName},
		{"a wildcard in the name is refused", []string{"spiffe://example.org/device/%23"}, Identity{}, ErrInvalidName},
		{"an https URI is refused", []string{"https://example.org/device/d-1"}, Identity{}, ErrMalformedURI},
		{"a query string is refused", []string{"spiffe://example.org/device/d-1?x=1"}, Identity{}, ErrMalformedURI},
		{"a port is refused", []string{"spiffe://example.org:1/device/d-1"}, Identity{}, ErrMalformedURI},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &x509.Certificate{}
			for _, u := range tc.uris {
				c.URIs = append(c.URIs, mustURL(u))
			}
			got, err := FromCertificate(c, td)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("err = %v, want %v", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
			// Round trip through URI.
			back, err := ParseURI(got.URI(td), td)
			if err != nil || back != got {
				t.Fatalf("round trip: %v %v", back, err)
			}
		})
	}
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"spiffe://td/device/a", "spiffe://td/service/x/y", "spiffe://td/device/%2F", "spiffe://td//device/a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := url.Parse(s)
		if err != nil {
			return
		}
		id, err := ParseURI(u, "td")
		if err != nil {
			return
		}
		// Anything accepted is a valid name that round-trips.
		if ValidateName(id.Name) != nil {
			t.Fatalf("accepted invalid name %q from %q", id.Name, s)
		}
		if strings.ContainsAny(id.Name, "/+#$\x00") {
			t.Fatalf("accepted topic-unsafe name %q", id.Name)
		}
	})
}
