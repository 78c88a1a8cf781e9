//! The module-loader container's script: one fixed POSIX `sh` program whose inputs are
//! `KMM_*` environment variables (lists newline-separated; unset or empty means none).
//!
//! `sh -c "$LOADER_SCRIPT"` loads (in-tree removals, firmware copy, soft dependencies,
//! modprobe), writes `/tmp/kmm-loaded` (the module version it expects) and sleeps until
//! stopped; on SIGTERM it exits 0 when the module is gone from the kernel and 3 when it is
//! still loaded. `sh -c "$LOADER_SCRIPT" loader unload` (the preStop hook) unloads and
//! removes the firmware files it copied; `loader check` (the readiness probe) asks the
//! kernel (`/sys/module/<name>`). `docs/kmod-image.md` describes the contract.
//!
//! `KMM_SANDBOX_ROOT` (never set by the agent) prefixes the paths the script touches outside
//! the image (`/sys/module`, `/etc/modprobe.d`, `/tmp`, `/dev`) so tests can run it with a
//! fake `modprobe` without touching the machine.

/// The loader script (see the module documentation).
pub const LOADER_SCRIPT: &str = r#"# kmm-fleet module loader. Usage: sh -c "$SCRIPT" [loader load|unload|check]
set -u
nl='
'
IFS=$nl
set -f
root=${KMM_SANDBOX_ROOT:-}
dir=${KMM_DIR_NAME:-/opt}
fw_src=${KMM_FIRMWARE_PATH:-}
fw_dst=${KMM_FIRMWARE_HOST_PATH:-/var/lib/firmware}
fw_list=$fw_dst/.kmm-fleet/${KMM_MODULE_KEY:-module}.files
ready=$root/tmp/kmm-loaded
softdep=$root/etc/modprobe.d/kmm-softdep.conf
tlog=$root/dev/termination-log

say() { printf 'kmm-loader: %s\n' "$1" >&2; }

# Run a command; print what it said; on failure also leave it as the termination message.
run() {
  printf 'kmm-loader: running:' >&2
  printf ' %s' "$@" >&2
  printf '\n' >&2
  out=$("$@" 2>&1)
  rc=$?
  if [ -n "$out" ]; then printf '%s\n' "$out" >&2; fi
  if [ "$rc" -ne 0 ]; then
    printf '%s\n' "$out" > "$tlog" 2>/dev/null || true
  fi
  return "$rc"
}

fail() { say "$1"; printf '%s\n' "$1" > "$tlog" 2>/dev/null; exit 1; }

kname() { printf '%s' "$1" | tr '-' '_'; }

# The kernel's word: a loadable module is live while /sys/module/<name>/initstate exists.
is_loaded() { [ -e "$root/sys/module/$(kname "$1")/initstate" ]; }

# The module the readiness check and the stop look at (none with rawArgs only).
main=$(kname "${KMM_MODULE_NAME:-}")

# Firmware: directories and regular files only (symbolic links in the image are skipped),
# never written through a symbolic link on the host, files already there with the same
# content left alone; what was copied is listed for the unload.
copy_firmware() {
  [ -d "$fw_src" ] || fail "firmware directory $fw_src not found in the image"
  mkdir -p "${fw_list%/*}" || fail "cannot create ${fw_list%/*}"
  [ -f "$fw_list" ] || : > "$fw_list" || fail "cannot write $fw_list"
  (cd "$fw_src" && find . -type l) | while IFS= read -r l; do
    say "firmware: skipping the symbolic link ${l#./}"
  done
  (cd "$fw_src" && find . -type d) | while IFS= read -r d; do
    t=$fw_dst/${d#./}
    if [ -L "$t" ]; then say "firmware: $t is a symbolic link; not writing through it"; exit 1; fi
    mkdir -p "$t" || exit 1
  done || fail "cannot create the firmware directories under $fw_dst"
  (cd "$fw_src" && find . -type f) | while IFS= read -r f; do
    f=${f#./}
    t=$fw_dst/$f
    ours=0
    if grep -qxF "$f" "$fw_list" 2>/dev/null; then ours=1; fi
    if [ -L "$t" ]; then say "firmware: $t is a symbolic link; not writing through it"; exit 1; fi
    if [ -e "$t" ] && [ "$ours" = 0 ]; then
      if cmp -s "$fw_src/$f" "$t"; then continue; fi
      say "firmware: $t exists with other content and is not this module's"; exit 1
    fi
    cp "$fw_src/$f" "$t" || exit 1
    if [ "$ours" = 0 ]; then printf '%s\n' "$f" >> "$fw_list" || exit 1; fi
  done || fail "cannot copy firmware from $fw_src to $fw_dst"
  # The kernel looks in /lib/firmware by default; point it at the host path too.
  fwc=$root/sys/module/firmware_class/parameters/path
  if [ -w "$fwc" ] && [ "$(cat "$fwc")" != "$fw_dst" ]; then
    printf '%s' "$fw_dst" > "$fwc" || say "cannot set $fwc; firmware may not be found"
  fi
}

remove_firmware() {
  [ -f "$fw_list" ] || return 0
  while IFS= read -r f; do
    t=$fw_dst/$f
    case "/$f/" in */../*) continue ;; esac
    if [ -f "$t" ] && [ ! -L "$t" ]; then rm -f "$t"; fi
  done < "$fw_list"
  rm -f "$fw_list"
}

# Stopped (SIGTERM, after the preStop hook): the exit status says what the kernel has. 0: the
# module is gone; 3: it is still loaded (the unload failed), with the reason as the
# termination message — the agent keeps the node's labels and reports it.
stopped() {
  if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null; fi
  if [ -n "$main" ] && is_loaded "$main"; then
    why=$(cat "$tlog" 2>/dev/null)
    printf 'unload failed: %s is still loaded%s\n' "$main" "${why:+: $why}" > "$tlog" 2>/dev/null
    say "unload failed: $main is still loaded"
    exit 3
  fi
  exit 0
}

load() {
  for m in ${KMM_IN_TREE_REMOVE:-}; do
    if is_loaded "$m"; then
      run modprobe -r "$m" || fail "cannot remove the in-tree module $m"
    fi
  done
  want=
  if [ -n "$main" ] && [ -z "${KMM_RAW_LOAD:-}" ]; then
    want=$(modinfo -b "$dir" -F version "$KMM_MODULE_NAME" 2>/dev/null) || want=
    if [ -n "$want" ] && is_loaded "$main"; then
      have=$(cat "$root/sys/module/$main/version" 2>/dev/null)
      if [ "$have" != "$want" ]; then
        fail "$main ${have:-without a version} is loaded, this image has $want: it must be unloaded first"
      fi
    fi
  fi
  if [ -n "$fw_src" ]; then copy_firmware; fi
  if [ -n "${KMM_RAW_LOAD:-}" ]; then
    run modprobe $KMM_RAW_LOAD || exit 1
  else
    if [ -n "${KMM_LOADING_ORDER:-}" ]; then
      mkdir -p "${softdep%/*}" && : > "$softdep" || fail "cannot write $softdep"
      prev=
      for m in $KMM_LOADING_ORDER; do
        if [ -n "$prev" ]; then printf 'softdep %s pre: %s\n' "$prev" "$m" >> "$softdep"; fi
        prev=$m
      done
    fi
    run modprobe -d "$dir" ${KMM_ARGS_LOAD:-} "${KMM_MODULE_NAME:-}" ${KMM_PARAMETERS:-} || exit 1
  fi
  # Sleep until stopped; the trap also ends the current sleep so nothing is left behind.
  sleeper=
  trap stopped TERM INT
  # The version the readiness check expects in /sys/module/<name>/version.
  mkdir -p "${ready%/*}" && printf '%s' "$want" > "$ready" || exit 1
  say "loaded"
  while :; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
  done
}

# Readiness: the kernel has the module live, in the version of this image when it has one.
check() {
  [ -f "$ready" ] || exit 1
  [ -n "$main" ] || exit 0
  is_loaded "$main" || { say "$main is not loaded"; exit 1; }
  want=$(cat "$ready")
  if [ -n "$want" ] && [ "$(cat "$root/sys/module/$main/version" 2>/dev/null)" != "$want" ]; then
    say "$main is loaded, but not version $want"
    exit 1
  fi
}

unload() {
  if [ -n "${KMM_RAW_UNLOAD:-}" ]; then
    run modprobe $KMM_RAW_UNLOAD || exit 1
  else
    mods=${KMM_LOADING_ORDER:-${KMM_MODULE_NAME:-}}
    if ! run modprobe -r -d "$dir" ${KMM_ARGS_UNLOAD:-} $mods; then
      # Listing a soft dependency that went with an earlier module fails; what counts is
      # whether anything is still loaded.
      for m in $mods; do
        if is_loaded "$m"; then say "$m is still loaded"; exit 1; fi
      done
    fi
  fi
  if [ -n "$fw_src" ]; then remove_firmware; fi
  rm -f "$ready"
  say "unloaded"
}

case "${1:-load}" in
  load) load ;;
  unload) unload ;;
  check) check ;;
  *) say "unknown action $1 (load, unload or check)"; exit 2 ;;
esac
"#;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "loader_script_tests.rs"]
mod tests;
