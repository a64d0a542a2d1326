package server

import (
	"net"
	"testing"
)

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
