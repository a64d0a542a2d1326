package enroll

import (
	"net/http"
	"testing"
)

func TestRefusalKeyGroupsIPv6By64(t *testing.T) {
	key := func(remote string) string { return refusalKey(&http.Request{RemoteAddr: remote}, "token_unknown") }
	if a, b := key("[2001:db8:1:2::1]:443"), key("[2001:db8:1:2:ffff::9]:1"); a != b || a != "2001:db8:1:2::/64 token_unknown" {
		t.Fatalf("one /64, two keys: %q %q", a, b)
	}
	if a, b := key("[2001:db8:1:3::1]:443"), key("[2001:db8:1:2::1]:443"); a == b {
		t.Fatal("two /64s share a key")
	}
	if k := key("192.0.2.7:5000"); k != "192.0.2.7 token_unknown" {
		t.Fatalf("IPv4 key %q", k)
	}
}
