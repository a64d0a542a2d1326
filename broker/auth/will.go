package auth

import (
	mqtt "github.com/mochi-mqtt/server/v2"
)

// OnWill implements mqtt.Hook: at the moment mochi is about to send a Last
// Will, the client must still be allowed to publish it (its device active,
// the policy unchanged); otherwise the will is emptied and goes nowhere.
func (h *Hook) OnWill(cl *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	s, ok := h.Session(cl)
	if ok {
		if sub, ok := h.subject(s); ok && h.o.Policy().CheckPublish(sub, will.TopicName, will.Retain).Allowed {
			return will, nil
		}
	}
	h.o.Logger.Info("last will dropped", "client", cl.ID, "topic", will.TopicName)
	if h.o.Metrics.ACLDenied != nil {
		h.o.Metrics.ACLDenied("will")
	}
	return mqtt.Will{}, nil
}
