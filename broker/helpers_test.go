package broker_test

import (
	"github.com/fleetgate/fleetgate/devicesdk"
	"github.com/fleetgate/fleetgate/internal/testenv"
)

type devicesdkMessage = devicesdk.Message

func brokerOpts(g *testenv.Gateway) devicesdk.ConnectOptions {
	return devicesdk.ConnectOptions{BrokerAddr: g.Addrs.MQTT, ServerName: "localhost", CleanSession: true}
}
