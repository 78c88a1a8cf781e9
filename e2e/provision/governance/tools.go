//go:build tools

// Package tools pins the commands this module builds.
package tools

import (
	_ "open-cluster-management.io/config-policy-controller"
	_ "open-cluster-management.io/governance-policy-propagator"
)
