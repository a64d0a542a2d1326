package main

import "github.com/spf13/cobra"

// addEKCommands adds manufacturing registration (register, import) to the
// devices command.
func addEKCommands(devices *cobra.Command, af *adminFlags) {}
