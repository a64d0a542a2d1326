// Command fleetbench is fleetgate's load generator and benchmark harness:
// it runs the scenarios of docs/performance.md against fleetgate, Mosquitto
// and NATS's MQTT listener side by side and writes a table, a JSON file and an SVG chart
// of the ratios under --out.
//
//	fleetbench --fleetgate bin/fleetgate --out results
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fleetgate/fleetgate/bench"
)

func main() {
	cfg := bench.DefaultConfig()
	fgBin := flag.String("fleetgate", "bin/fleetgate", "fleetgate binary")
	mqBin := flag.String("mosquitto", bench.MosquittoBin, "mosquitto binary")
	natsBin := flag.String("nats-server", bench.NATSBin, "nats-server binary (make bench builds it from the module go.mod pins)")
	peers := flag.String("peers", strings.Join(cfg.Peers, ","), "brokers run beside fleetgate: mosquitto, nats (comma-separated)")
	out := flag.String("out", "results", "results folder")
	work := flag.String("work", "", "working directory (PKI, device certificates, broker logs); default: a new one under --out, removed at the end unless --keep; an existing one is reused (no re-enrollment)")
	keep := flag.Bool("keep", false, "keep the working directory")
	flag.IntVar(&cfg.Reps, "reps", cfg.Reps, "repetitions of each scenario per broker")
	flag.DurationVar(&cfg.ConnectFor, "connect-for", cfg.ConnectFor, "duration of each run of scenarios 1 and 2")
	flag.IntVar(&cfg.ConnectWorkers, "connect-workers", cfg.ConnectWorkers, "concurrent connecting clients (1, 2)")
	flag.DurationVar(&cfg.FanInFor, "fanin-for", cfg.FanInFor, "publishing time of each run of scenarios 3 and 4")
	flag.IntVar(&cfg.Publishers, "publishers", cfg.Publishers, "publishing devices (3, 4)")
	flag.IntVar(&cfg.QoS1Window, "qos1-window", cfg.QoS1Window, "unacknowledged QoS 1 PUBLISH per publisher (4)")
	flag.IntVar(&cfg.IdleConns, "idle", cfg.IdleConns, "idle connections (5)")
	flag.IntVar(&cfg.RevokePerRep, "revoke", cfg.RevokePerRep, "devices revoked per run (6)")
	flag.IntVar(&cfg.Enrollments, "enrollments", cfg.Enrollments, "token enrollments per run (7)")
	flag.IntVar(&cfg.EnrollWorkers, "enroll-workers", cfg.EnrollWorkers, "concurrent enrolling devices (7)")
	flag.IntVar(&cfg.TPMDevices, "tpm-devices", cfg.TPMDevices, "swtpm devices enrolling in a loop (7, TPM path; 0: skip)")
	flag.IntVar(&cfg.TPMRounds, "tpm-rounds", cfg.TPMRounds, "TPM enrollments per swtpm device per run (7)")
	hybrid := flag.Bool("hybrid-kex", false, "offer the post-quantum hybrid key exchange X25519MLKEM768 (Mosquitto cannot negotiate it: it then gets X25519, fleetgate the hybrid)")
	flag.StringVar(&cfg.Scenarios, "scenarios", cfg.Scenarios, "scenarios to run: 1-7 single node, a-f cluster (docs/performance.md)")
	cluster := flag.Bool("cluster", false, "run only the cluster scenarios (--scenarios "+bench.ClusterScenarios+")")
	flag.IntVar(&cfg.ClusterReps, "cluster-reps", cfg.ClusterReps, "repetitions of each cluster scenario per broker (a-f)")
	flag.DurationVar(&cfg.ClusterFor, "cluster-for", cfg.ClusterFor, "duration of each run of cluster scenarios a-d")
	flag.Float64Var(&cfg.ClusterRate, "cluster-rate", cfg.ClusterRate, "QoS 1 messages per second in all, paced (d)")
	flag.IntVar(&cfg.ClusterRevoke, "cluster-revoke", cfg.ClusterRevoke, "devices revoked per run across nodes (e)")
	flag.IntVar(&cfg.FailoverDevices, "failover-devices", cfg.FailoverDevices, "devices on the SIGKILLed node (f)")
	flag.Float64Var(&cfg.FailoverRate, "failover-rate", cfg.FailoverRate, "QoS 1 messages per second per device (f)")
	flag.Parse()
	if *cluster {
		cfg.Scenarios = bench.ClusterScenarios
	}
	bench.MosquittoBin = *mqBin
	bench.NATSBin = *natsBin
	cfg.Peers = nil
	for _, p := range strings.Split(*peers, ",") {
		if p = strings.TrimSpace(p); p != "" {
			cfg.Peers = append(cfg.Peers, p)
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logf := func(f string, a ...any) {
		fmt.Fprintf(os.Stderr, "%s "+f+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
	}

	if err := os.MkdirAll(*out, 0o755); err != nil {
		fatal(err)
	}
	stamp := time.Now().Format("20060102-150405")
	wd := *work
	temp := false
	if wd == "" {
		wd = filepath.Join(*out, "work-"+stamp)
		temp = !*keep
	}
	wd, _ = filepath.Abs(wd)
	fg, _ := filepath.Abs(*fgBin)
	env := &bench.Env{Work: wd, FleetgateBin: fg, Logf: logf, HybridKeyExchange: *hybrid}
	if err := os.MkdirAll(wd, 0o700); err != nil {
		fatal(err)
	}
	res, err := bench.Run(ctx, env, cfg)
	if temp && err == nil {
		os.RemoveAll(wd)
	} else {
		logf("working directory (logs, certificates): %s", wd)
	}
	if res != nil && len(res.Metrics) > 0 {
		fmt.Println()
		res.Table(os.Stdout, false)
		fmt.Println()
		res.ClusterTable(os.Stdout, false)
		jp := filepath.Join(*out, "bench-"+stamp+".json")
		sp := filepath.Join(*out, "bench-"+stamp+".svg")
		mp := filepath.Join(*out, "bench-"+stamp+".md")
		if e := res.WriteJSON(jp); e != nil {
			logf("write %s: %v", jp, e)
		}
		if e := res.WriteSVG(sp); e != nil {
			logf("write %s: %v", sp, e)
		}
		if f, e := os.Create(mp); e == nil {
			res.Table(f, true)
			fmt.Fprintln(f)
			res.ClusterTable(f, true)
			f.Close()
		}
		fmt.Printf("\nresults: %s, %s (chart), %s (Markdown table)\n", jp, sp, mp)
		for _, e := range res.Errors {
			fmt.Println("error:", e)
		}
	}
	if err != nil {
		fatal(err)
	}
	if res != nil && len(res.Errors) > 0 {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "fleetbench:", err)
	os.Exit(1)
}
