#!/bin/bash
# The test world's podman on a real-kernel node's host OS: the part of podman's command line the
# Day-1 scripts use, over an image store of unpacked root file systems. This machine has no
# container runtime to put in a VM, so this stands for one, as the simulated kubelet does.
#
#   image exists IMAGE            exit 0 when IMAGE is in the node's store
#   pull [--quiet] [--authfile F] IMAGE
#                                 copy IMAGE from what the registry serves once the network is
#                                 up (/var/lib/kmm-sim-podman/reachable), else fail as podman does
#   create [--quiet] IMAGE CMD…   a container of IMAGE (never started); prints its ID
#   cp ID:PATH DEST               copy PATH out of the container's root
#   rm [--force] ID               remove the container
set -euo pipefail
store=/var/lib/kmm-sim-podman
key() { printf '%s' "$1" | tr '/:@' '___'; }
fail() { echo "Error: $*" >&2; exit 125; }

verb=${1:-}
shift || true
case "$verb" in
  image)
    [ "${1:-}" = exists ] || fail "unsupported: podman image ${1:-}"
    [ -d "$store/images/$(key "${2:?image}")" ]
    ;;
  pull)
    image=
    while [ $# -gt 0 ]; do
      case "$1" in
        --quiet|-q) ;;
        --authfile) shift ;;
        *) image=$1 ;;
      esac
      shift
    done
    [ -n "$image" ] || fail "pull: no image"
    k=$(key "$image")
    if [ ! -d "$store/reachable/$k" ]; then
      fail "initializing source docker://$image: pinging container registry: dial tcp: connect: network is unreachable"
    fi
    mkdir -p "$store/images"
    rm -rf "$store/images/$k.partial"
    cp -a "$store/reachable/$k" "$store/images/$k.partial"
    mv "$store/images/$k.partial" "$store/images/$k"
    echo "sha256:$k"
    ;;
  create)
    [ "${1:-}" = --quiet ] && shift
    image=${1:?image}
    k=$(key "$image")
    [ -d "$store/images/$k" ] || fail "$image: image not known"
    mkdir -p "$store/containers"
    id=$(printf '%04x%04x%04x' "$RANDOM" "$RANDOM" "$RANDOM")
    printf '%s' "$k" >"$store/containers/$id"
    echo "$id"
    ;;
  cp)
    src=${1:?source}
    dest=${2:?destination}
    id=${src%%:*}
    path=${src#*:}
    [ -f "$store/containers/$id" ] || fail "no container with name or ID \"$id\" found"
    root=$store/images/$(cat "$store/containers/$id")
    [ -e "$root$path" ] || fail "\"$path\" could not be found on container $id: no such file or directory"
    cp -a "$root$path" "$dest"
    ;;
  rm)
    [ "${1:-}" = --force ] || [ "${1:-}" = -f ] && shift
    rm -f "$store/containers/${1:?container}"
    ;;
  *)
    fail "unsupported: podman $verb"
    ;;
esac
