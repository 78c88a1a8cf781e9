#!/bin/bash
# The test world's systemctl on a real-kernel node's host OS: records what the Day-1 scripts ask
# of systemd (one line per request in /var/lib/kmm-sim-systemd/requests) for the test to act on;
# rebooting the VM is the test's part.
set -euo pipefail
mkdir -p /var/lib/kmm-sim-systemd
echo "$*" >>/var/lib/kmm-sim-systemd/requests
