package bench

import (
	"time"

	"github.com/fleetgate/fleetgate/internal/fleetproc"
)

// cpuMeter measures the CPU of a broker's processes (a cluster's nodes,
// summed) over an interval.
type cpuMeter struct {
	pids  []int
	start time.Duration
}

func startCPU(pids ...int) (*cpuMeter, error) {
	t, err := cpuTime(pids)
	return &cpuMeter{pids: pids, start: t}, err
}

func (m *cpuMeter) since() (time.Duration, error) {
	t, err := cpuTime(m.pids)
	return t - m.start, err
}

func cpuTime(pids []int) (time.Duration, error) { return sum(pids, fleetproc.CPUTime) }

// rss is the resident memory of the processes, summed.
func rss(pids []int) (int64, error) { return sum(pids, fleetproc.RSS) }

// sum adds f of every process.
func sum[T time.Duration | int64](pids []int, f func(int) (T, error)) (T, error) {
	var total T
	for _, pid := range pids {
		x, err := f(pid)
		if err != nil {
			return 0, err
		}
		total += x
	}
	return total, nil
}
