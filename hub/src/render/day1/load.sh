#!/bin/bash
# kmm-fleet Day 1, load step: put an out-of-tree kernel module in place of the in-tree one
# early in boot, before the network is configured.
#
#   kmm-day1-load IMAGE MODULE [IN_TREE_MODULE]
#
# IMAGE is an image, or @FILE: a list of "<kernel> <image>" lines (what the hub ships, one
# digest-pinned image per kernel) of which the running kernel's is taken.
#
# Run by kmm-day1-load-MODULE.service (written by `kmm-hub machineconfig`). IMAGE is a kmod
# image holding MODULE under /opt/lib/modules/<kernel>/, like the images of Day 2 loading.
# The network may not be up yet, so the image is pulled only when it is not on the node; when
# it is neither there nor pullable the script does nothing and exits 0: the pull service
# fetches the image once NetworkManager runs and reboots the node, and the next boot loads.
set -euo pipefail

usage="usage: kmm-day1-load IMAGE MODULE [IN_TREE_MODULE]"
image=${1:?$usage}
module=${2:?$usage}
in_tree=${3:-$module}
kernel=$(uname -r)
work=/var/lib/kmm-day1/$module

log() { echo "kmm-day1-load: $*" >&2; }

# The image listed for kernel $2 in file $1 (empty when none is).
image_for_kernel() { awk -v k="$2" '$1 == k { print $2; exit }' "$1"; }

if [ "${image#@}" != "$image" ]; then
  list=${image#@}
  image=$(image_for_kernel "$list" "$kernel" || true)
  if [ -z "$image" ]; then
    log "$list lists no image for kernel $kernel; nothing is loaded before the network"
    exit 0
  fi
fi

# Loaded modules appear in /proc/modules with underscores for dashes.
loaded() { grep -q "^${1//-/_} " /proc/modules; }

if ! podman image exists "$image"; then
  auth=()
  if [ -f /var/lib/kubelet/config.json ]; then auth=(--authfile /var/lib/kubelet/config.json); fi
  if ! podman pull --quiet "${auth[@]}" "$image" >/dev/null; then
    log "$image is not on this node and cannot be pulled yet; kmm-day1-pull-$module.service will pull it and reboot"
    exit 0
  fi
fi

# Copy the modules for the running kernel out of the image into a private module root.
rm -rf "$work"
mkdir -p "$work/lib/modules"
# The command is never run: kmod images need not hold a shell or an entry point.
container=$(podman create --quiet "$image" /kmm-day1-not-run)
trap 'podman rm --force "$container" >/dev/null 2>&1 || true' EXIT
if ! podman cp "$container:/opt/lib/modules/$kernel" "$work/lib/modules/$kernel"; then
  log "$image has no /opt/lib/modules/$kernel: it was not built for this node's kernel"
  exit 1
fi
if [ ! -f "$work/lib/modules/$kernel/modules.dep" ]; then
  depmod -b "$work" "$kernel"
fi

# The in-tree module goes first; failing to unload it (another module uses it) fails the unit.
if loaded "$in_tree"; then
  log "unloading in-tree module $in_tree"
  modprobe -r "$in_tree"
fi
log "loading $module for kernel $kernel from $image"
modprobe -d "$work" "$module"
loaded "$module" || { log "$module is not loaded after modprobe"; exit 1; }
log "$module loaded"
