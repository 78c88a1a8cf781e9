//! The module-loader container's script: one fixed POSIX `sh` program whose inputs are
//! `KMM_*` environment variables (lists newline-separated; unset or empty means none).
//!
//! `sh -c "$LOADER_SCRIPT"` loads (in-tree removals, firmware copy, soft dependencies,
//! modprobe), marks the container ready by creating `/tmp/kmm-loaded` and sleeps until
//! stopped. `sh -c "$LOADER_SCRIPT" loader unload` (the preStop hook) unloads and removes
//! the firmware files it copied. `docs/kmod-image.md` describes the contract.
//!
//! `KMM_SANDBOX_ROOT` (never set by the agent) prefixes the paths the script touches outside
//! the image (`/proc/modules`, `/etc/modprobe.d`, `/tmp`, `/sys`) so tests can run it with a
//! fake `modprobe` without touching the machine.

/// The loader script (see the module documentation).
pub const LOADER_SCRIPT: &str = r#"# kmm-fleet module loader. Usage: sh -c "$SCRIPT" [loader load|unload]
set -u
nl='
'
IFS=$nl
set -f
root=${KMM_SANDBOX_ROOT:-}
dir=${KMM_DIR_NAME:-/opt}
fw_src=${KMM_FIRMWARE_PATH:-}
fw_dst=${KMM_FIRMWARE_HOST_PATH:-/var/lib/firmware}
ready=$root/tmp/kmm-loaded
softdep=$root/etc/modprobe.d/kmm-softdep.conf

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
    printf '%s\n' "$out" > "$root/dev/termination-log" 2>/dev/null || true
  fi
  return "$rc"
}

is_loaded() {
  m=$(printf '%s' "$1" | tr '-' '_')
  grep -q "^$m " "$root/proc/modules" 2>/dev/null
}

load() {
  for m in ${KMM_IN_TREE_REMOVE:-}; do
    if is_loaded "$m"; then
      run modprobe -r "$m" || { say "cannot remove the in-tree module $m"; exit 1; }
    fi
  done
  if [ -n "$fw_src" ]; then
    if [ ! -d "$fw_src" ]; then say "firmware directory $fw_src not found in the image"; exit 1; fi
    mkdir -p "$fw_dst" && cp -R "$fw_src/." "$fw_dst/" || { say "cannot copy firmware from $fw_src to $fw_dst"; exit 1; }
    # The kernel looks in /lib/firmware by default; point it at the host path too.
    fwc=$root/sys/module/firmware_class/parameters/path
    if [ -w "$fwc" ] && [ "$(cat "$fwc")" != "$fw_dst" ]; then
      printf '%s' "$fw_dst" > "$fwc" || say "cannot set $fwc; firmware may not be found"
    fi
  fi
  if [ -n "${KMM_RAW_LOAD:-}" ]; then
    run modprobe $KMM_RAW_LOAD || exit 1
  else
    if [ -n "${KMM_LOADING_ORDER:-}" ]; then
      mkdir -p "${softdep%/*}" && : > "$softdep" || { say "cannot write $softdep"; exit 1; }
      prev=
      for m in $KMM_LOADING_ORDER; do
        if [ -n "$prev" ]; then printf 'softdep %s pre: %s\n' "$prev" "$m" >> "$softdep"; fi
        prev=$m
      done
    fi
    run modprobe -d "$dir" ${KMM_ARGS_LOAD:-} "${KMM_MODULE_NAME:-}" ${KMM_PARAMETERS:-} || exit 1
  fi
  mkdir -p "${ready%/*}" && touch "$ready" || exit 1
  say "loaded"
  # Sleep until stopped; the trap also ends the current sleep so nothing is left behind.
  sleeper=
  trap 'if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null; fi; exit 0' TERM INT
  while :; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
  done
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
  if [ -n "$fw_src" ] && [ -d "$fw_src" ]; then
    (cd "$fw_src" && find . -type f) | while IFS= read -r f; do
      rm -f "$fw_dst/${f#./}"
    done
  fi
  rm -f "$ready"
  say "unloaded"
}

case "${1:-load}" in
  load) load ;;
  unload) unload ;;
  *) say "unknown action $1 (load or unload)"; exit 2 ;;
esac
"#;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::LOADER_SCRIPT;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// A sandbox: a fake `modprobe` that logs its arguments and keeps a fake /proc/modules.
    struct Sandbox {
        dir: tempfile::TempDir,
    }

    impl Sandbox {
        fn new(loaded: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for d in ["bin", "proc", "tmp", "etc", "image/fw/sub", "host-fw"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            let modules: String = loaded
                .iter()
                .map(|m| format!("{m} 16384 0 - Live 0x0\n"))
                .collect();
            std::fs::write(root.join("proc/modules"), modules).unwrap();
            std::fs::write(root.join("image/fw/a.bin"), "a").unwrap();
            std::fs::write(root.join("image/fw/sub/b.bin"), "b").unwrap();
            // The fake modprobe: logs one line per call; `-r` removes names from /proc/modules,
            // otherwise the last non-option argument is "loaded"; FAIL_ON makes a name fail.
            let fake = format!(
                r#"#!/bin/sh
printf '%s\n' "$*" >> {root}/calls
remove=0
for a in "$@"; do [ "$a" = "-r" ] && remove=1; done
last=""
skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case "$a" in -d) skip=1 ;; -*) ;; *=*) ;; *) last="$a"
    if [ "${{FAIL_ON:-}}" = "$a" ]; then echo "modprobe: FATAL: Module $a not found in directory" >&2; exit 1; fi
    if [ $remove = 1 ]; then n=$(printf '%s' "$a" | tr - _); grep -v "^$n " {root}/proc/modules > {root}/proc/m2; mv {root}/proc/m2 {root}/proc/modules; fi ;;
  esac
done
if [ $remove = 0 ] && [ -n "$last" ]; then printf '%s 1 0 - Live 0x0\n' "$(printf '%s' "$last" | tr - _)" >> {root}/proc/modules; fi
exit 0
"#,
                root = root.display()
            );
            let m = root.join("bin/modprobe");
            std::fs::write(&m, fake).unwrap();
            Command::new("chmod").arg("+x").arg(&m).status().unwrap();
            Self { dir }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn run(&self, env: &[(&str, &str)], unload: bool) -> (bool, String) {
            let root = self.root();
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(LOADER_SCRIPT);
            if unload {
                cmd.arg("loader").arg("unload");
            } else {
                // `load` never returns on success: stop it once it is ready.
                cmd.arg("loader").arg("load");
            }
            cmd.env_clear()
                .env(
                    "PATH",
                    format!("{}:/usr/bin:/bin", root.join("bin").display()),
                )
                .env("KMM_SANDBOX_ROOT", root)
                .env("KMM_DIR_NAME", "/opt");
            for (k, v) in env {
                cmd.env(k, v);
            }
            // Output goes to a file: a pipe could be held open by a stray child.
            let log_path = root.join(if unload { "unload.log" } else { "load.log" });
            let log_file = std::fs::File::create(&log_path).unwrap();
            cmd.stdout(Stdio::null()).stderr(Stdio::from(log_file));
            let mut child = cmd.spawn().unwrap();
            if !unload {
                // Wait for readiness or exit, whichever comes first (no timing assumptions).
                loop {
                    if root.join("tmp/kmm-loaded").exists() {
                        Command::new("kill")
                            .arg(child.id().to_string())
                            .status()
                            .unwrap();
                        break;
                    }
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            let status = child.wait().unwrap();
            let ok = if unload {
                status.success()
            } else {
                root.join("tmp/kmm-loaded").exists() && status.success()
            };
            (ok, std::fs::read_to_string(&log_path).unwrap_or_default())
        }

        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.root().join("calls"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        }

        fn read(&self, p: &str) -> String {
            std::fs::read_to_string(self.root().join(p)).unwrap_or_default()
        }
    }

    #[test]
    fn is_valid_posix_sh() {
        let out = Command::new("/bin/sh")
            .arg("-n")
            .arg("-c")
            .arg(LOADER_SCRIPT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn loads_after_removing_loaded_in_tree_modules() {
        let sb = Sandbox::new(&["joydev"]);
        let (ok, log) = sb.run(
            &[
                ("KMM_MODULE_NAME", "kmm_ci_a"),
                ("KMM_IN_TREE_REMOVE", "joydev\nnot-loaded"),
                ("KMM_PARAMETERS", "a=1\nb=2"),
            ],
            false,
        );
        assert!(ok, "{log}");
        assert_eq!(
            sb.calls(),
            vec!["-r joydev", "-d /opt kmm_ci_a a=1 b=2"],
            "{log}"
        );
        assert!(!sb.read("proc/modules").contains("joydev"));
        assert!(sb.read("proc/modules").contains("kmm_ci_a"));
    }

    #[test]
    fn soft_dependencies_are_written_and_unloaded_in_order() {
        let sb = Sandbox::new(&[]);
        let env = [
            ("KMM_MODULE_NAME", "kmm_ci_a"),
            ("KMM_LOADING_ORDER", "kmm_ci_a\nkmm_ci_b\nkmm_ci_c"),
            ("KMM_ARGS_LOAD", "-v"),
            ("KMM_ARGS_UNLOAD", "-v"),
        ];
        let (ok, log) = sb.run(&env, false);
        assert!(ok, "{log}");
        assert_eq!(
            sb.read("etc/modprobe.d/kmm-softdep.conf"),
            "softdep kmm_ci_a pre: kmm_ci_b\nsoftdep kmm_ci_b pre: kmm_ci_c\n"
        );
        let (ok, log) = sb.run(&env, true);
        assert!(ok, "{log}");
        assert_eq!(sb.calls()[1], "-r -d /opt -v kmm_ci_a kmm_ci_b kmm_ci_c");
        assert!(!sb.root().join("tmp/kmm-loaded").exists());
    }

    #[test]
    fn raw_args_replace_the_command() {
        let sb = Sandbox::new(&[]);
        let env = [
            ("KMM_RAW_LOAD", "-v\nkmm_ci_a\nx=1"),
            ("KMM_RAW_UNLOAD", "-rv\nkmm_ci_a"),
        ];
        assert!(sb.run(&env, false).0);
        assert!(sb.run(&env, true).0);
        assert_eq!(sb.calls(), vec!["-v kmm_ci_a x=1", "-rv kmm_ci_a"]);
    }

    #[test]
    fn firmware_is_copied_and_its_files_removed_on_unload() {
        let sb = Sandbox::new(&[]);
        let fw_src = sb.root().join("image/fw");
        let fw_dst = sb.root().join("host-fw");
        std::fs::write(fw_dst.join("other.bin"), "keep").unwrap();
        let env = [
            ("KMM_MODULE_NAME", "m"),
            ("KMM_FIRMWARE_PATH", fw_src.to_str().unwrap()),
            ("KMM_FIRMWARE_HOST_PATH", fw_dst.to_str().unwrap()),
        ];
        assert!(sb.run(&env, false).0);
        assert_eq!(sb.read("host-fw/a.bin"), "a");
        assert_eq!(sb.read("host-fw/sub/b.bin"), "b");
        assert!(sb.run(&env, true).0);
        assert!(!fw_dst.join("a.bin").exists() && !fw_dst.join("sub/b.bin").exists());
        assert!(fw_dst.join("sub").is_dir(), "directories are left");
        assert_eq!(
            sb.read("host-fw/other.bin"),
            "keep",
            "files it did not copy are left"
        );
    }

    #[test]
    fn a_failing_modprobe_fails_the_container_with_its_message() {
        let sb = Sandbox::new(&[]);
        let (ok, log) = sb.run(&[("KMM_MODULE_NAME", "nope"), ("FAIL_ON", "nope")], false);
        assert!(!ok);
        assert!(log.contains("Module nope not found"), "{log}");
    }
}
