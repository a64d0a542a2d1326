package cluster

import (
	"context"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// sessions: the session record of each client ID across the nodes.
type sessions struct{ r *Router }

func newSessions(r *Router) *sessions { return &sessions{r: r} }

func (s *sessions) open(ctx context.Context) error { return nil }

func (s *sessions) run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

func (s *sessions) established(cl *mqtt.Client, pk packets.Packet) {}

func (s *sessions) disconnected(cl *mqtt.Client, err error, expire bool) {}
