//go:build tools

// Package tools pins what this module builds (controller-gen) and the API package it reads.
package tools

import (
	_ "github.com/openshift/api/image/v1"
	_ "sigs.k8s.io/controller-tools/cmd/controller-gen"
)
