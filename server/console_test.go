package server

import (
	"net"
	"testing"

	"github.com/fleetgate/fleetgate/console"
	"github.com/fleetgate/fleetgate/identity"
)

type rolesOf map[string]string

func (r rolesOf) OperatorRole(name string) (string, error) { return r[name], nil }

// The console takes the registry's operator roles when it stores them.
func TestConsoleOperatorRoles(t *testing.T) {
	if operatorRoles(struct{}{}) != nil {
		t.Fatal("a registry without roles gave a role lookup")
	}
	f := operatorRoles(rolesOf{"viewer": "read-only", "boss": "admin"})
	for name, want := range map[string]console.Role{"viewer": console.RoleReadOnly, "boss": console.RoleAdmin} {
		if got, err := f(identity.Identity{Role: identity.RoleOperator, Name: name}); err != nil || got != want {
			t.Errorf("%s: %q %v, want %q", name, got, err, want)
		}
	}
}

func TestConsoleURL(t *testing.T) {
	for _, c := range []struct {
		conf string
		addr *net.TCPAddr
		want string
	}{
		{"", &net.TCPAddr{IP: net.IPv4zero, Port: 8444}, "https://localhost:8444"},
		{"", &net.TCPAddr{IP: net.IPv6unspecified, Port: 8444}, "https://localhost:8444"},
		{"", &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 1}, "https://127.0.0.1:1"},
		{"", &net.TCPAddr{IP: net.ParseIP("::1"), Port: 1}, "https://[::1]:1"},
		{"https://console.example", &net.TCPAddr{IP: net.IPv4zero, Port: 8444}, "https://console.example"},
	} {
		if got := consoleURL(c.conf, c.addr); got != c.want {
			t.Errorf("consoleURL(%q, %v) = %q, want %q", c.conf, c.addr, got, c.want)
		}
	}
}
