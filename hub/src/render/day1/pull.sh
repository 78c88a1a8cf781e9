#!/bin/bash
# kmm-fleet Day 1, pull step: make sure the kmod image is on the node once the network is up.
#
#   kmm-day1-pull IMAGE MODULE
#
# IMAGE is an image, or @FILE: a list of "<kernel> <image>" lines of which the running
# kernel's is taken.
#
# Run by kmm-day1-pull-MODULE.service after NetworkManager. When the image is on the node the
# load service found it at boot, and this exits 0. Otherwise it pulls the image and reboots
# the node, once per image: the next boot's load service then finds it before the network.
set -euo pipefail

usage="usage: kmm-day1-pull IMAGE MODULE"
image=${1:?$usage}
module=${2:?$usage}
state=/var/lib/kmm-day1
marker=$state/$module.rebooted-for

log() { echo "kmm-day1-pull: $*" >&2; }

# The image listed for kernel $2 in file $1 (empty when none is).
image_for_kernel() { awk -v k="$2" '$1 == k { print $2; exit }' "$1"; }

if [ "${image#@}" != "$image" ]; then
  list=${image#@}
  kernel=$(uname -r)
  image=$(image_for_kernel "$list" "$kernel" || true)
  if [ -z "$image" ]; then
    log "$list lists no image for kernel $kernel; nothing to pull"
    exit 0
  fi
fi

if podman image exists "$image"; then
  log "$image is on the node"
  exit 0
fi

auth=()
if [ -f /var/lib/kubelet/config.json ]; then auth=(--authfile /var/lib/kubelet/config.json); fi
pulled=0
for attempt in 1 2 3 4 5; do
  if podman pull --quiet "${auth[@]}" "$image" >/dev/null; then
    pulled=1
    break
  fi
  log "pulling $image failed (attempt $attempt of 5)"
  sleep $((attempt * 5))
done
if [ "$pulled" != 1 ]; then
  log "cannot pull $image; $module stays unloaded"
  exit 1
fi

# One reboot per image: if the image vanished again after it, rebooting once more would loop.
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$image" ]; then
  log "pulled $image, but this node already rebooted once for it; not rebooting again"
  exit 1
fi
mkdir -p "$state"
printf '%s' "$image" >"$marker"
sync
log "pulled $image; rebooting so that $module loads before the network"
systemctl reboot
