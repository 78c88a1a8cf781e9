// Pins OpenShift's published API module, whose MachineConfig and MachineConfigPool CRDs the
// test world installs to check `kmm-hub machineconfig` output. Nothing is built from it.
// Used through e2e/provision/provision.sh, never by hand.
module kmm-fleet.test/provision/openshift-api

go 1.26.0

require github.com/openshift/api v0.0.0-20251021124544-a2cb0c5d994d
