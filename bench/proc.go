package bench

import (
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// cpuMeter measures a process's CPU over an interval.
type cpuMeter struct {
	pid   int
	start time.Duration
}

func startCPU(pid int) (*cpuMeter, error) {
	t, err := fleetproc.CPUTime(pid)
	return &cpuMeter{pid: pid, start: t}, err
}

func (m *cpuMeter) since() (time.Duration, error) {
	t, err := fleetproc.CPUTime(m.pid)
	return t - m.start, err
}
