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
mod tests {
    use super::LOADER_SCRIPT;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// A sandbox: a fake `modprobe` that logs its arguments and keeps a fake /sys/module, and
    /// a fake `modinfo` that reports FAKE_IMAGE_VERSION.
    struct Sandbox {
        dir: tempfile::TempDir,
    }

    impl Sandbox {
        fn new(loaded: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            for d in [
                "bin",
                "sys/module",
                "dev",
                "tmp",
                "etc",
                "image/fw/sub",
                "host-fw",
            ] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            for m in loaded {
                let d = root.join("sys/module").join(m.replace('-', "_"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("initstate"), "live\n").unwrap();
            }
            std::fs::write(root.join("image/fw/a.bin"), "a").unwrap();
            std::fs::write(root.join("image/fw/sub/b.bin"), "b").unwrap();
            // The fake modprobe: logs one line per call; `-r` removes names from /sys/module
            // (FAIL_REMOVE: "in use"), otherwise the last non-option argument is "loaded" (with
            // FAKE_VERSION as its version); FAIL_ON makes a name fail.
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
    n=$(printf '%s' "$a" | tr - _)
    if [ $remove = 1 ] && [ "${{FAIL_REMOVE:-}}" = "$a" ]; then echo "modprobe: FATAL: Module $n is in use." >&2; exit 1; fi
    if [ $remove = 1 ]; then rm -rf {root}/sys/module/$n; fi ;;
  esac
done
if [ $remove = 0 ] && [ -n "$last" ] && [ -z "${{FAKE_NO_SYS:-}}" ]; then
  n=$(printf '%s' "$last" | tr - _)
  mkdir -p {root}/sys/module/$n && echo live > {root}/sys/module/$n/initstate
  if [ -n "${{FAKE_VERSION:-}}" ]; then printf '%s\n' "$FAKE_VERSION" > {root}/sys/module/$n/version; fi
fi
exit 0
"#,
                root = root.display()
            );
            let m = root.join("bin/modprobe");
            std::fs::write(&m, fake).unwrap();
            let i = root.join("bin/modinfo");
            std::fs::write(
                &i,
                "#!/bin/sh\nprintf '%s\\n' \"${FAKE_IMAGE_VERSION:-}\"\n[ -n \"${FAKE_IMAGE_VERSION:-}\" ]\n",
            )
            .unwrap();
            Command::new("chmod")
                .arg("+x")
                .arg(&m)
                .arg(&i)
                .status()
                .unwrap();
            Self { dir }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn run(&self, env: &[(&str, &str)], unload: bool) -> (bool, String) {
            let (ok, _, log) = self.run_full(env, unload);
            (ok, log)
        }

        fn loaded(&self, m: &str) -> bool {
            self.root()
                .join("sys/module")
                .join(m)
                .join("initstate")
                .exists()
        }

        fn check(&self, env: &[(&str, &str)]) -> bool {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(LOADER_SCRIPT)
                .arg("loader")
                .arg("check")
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .env("KMM_SANDBOX_ROOT", self.root());
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.stderr(Stdio::null()).status().unwrap().success()
        }

        /// (ok, exit code, log). A load is stopped with SIGTERM once ready: its exit code
        /// says what the kernel has (0 gone, 3 still loaded).
        fn run_full(&self, env: &[(&str, &str)], unload: bool) -> (bool, Option<i32>, String) {
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
                root.join("tmp/kmm-loaded").exists()
            };
            (
                ok,
                status.code(),
                std::fs::read_to_string(&log_path).unwrap_or_default(),
            )
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
        assert!(!sb.loaded("joydev"));
        assert!(sb.loaded("kmm_ci_a"));
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
    fn firmware_is_copied_without_symlinks_and_unload_removes_only_what_it_copied() {
        let sb = Sandbox::new(&[]);
        let fw_src = sb.root().join("image/fw");
        let fw_dst = sb.root().join("host-fw");
        std::fs::write(fw_dst.join("other.bin"), "keep").unwrap();
        // A file of the same name and content already on the host is not this module's.
        std::fs::write(fw_src.join("shared.bin"), "s").unwrap();
        std::fs::write(fw_dst.join("shared.bin"), "s").unwrap();
        // A symbolic link in the image (to a host file once copied) is skipped.
        std::os::unix::fs::symlink("/etc/passwd", fw_src.join("evil.bin")).unwrap();
        let env = [
            ("KMM_MODULE_NAME", "m"),
            ("KMM_MODULE_KEY", "ns.m"),
            ("KMM_FIRMWARE_PATH", fw_src.to_str().unwrap()),
            ("KMM_FIRMWARE_HOST_PATH", fw_dst.to_str().unwrap()),
        ];
        let (ok, log) = sb.run(&env, false);
        assert!(ok, "{log}");
        assert!(log.contains("skipping the symbolic link evil.bin"), "{log}");
        assert_eq!(sb.read("host-fw/a.bin"), "a");
        assert_eq!(sb.read("host-fw/sub/b.bin"), "b");
        assert!(std::fs::symlink_metadata(fw_dst.join("evil.bin")).is_err());
        assert_eq!(
            sb.read("host-fw/.kmm-fleet/ns.m.files"),
            "a.bin\nsub/b.bin\n"
        );
        // A restarted container copies again and still knows its files.
        assert!(sb.run(&env, false).0);
        assert_eq!(
            sb.read("host-fw/.kmm-fleet/ns.m.files"),
            "a.bin\nsub/b.bin\n"
        );
        let (ok, log) = sb.run(&env, true);
        assert!(ok, "{log}");
        assert!(!fw_dst.join("a.bin").exists() && !fw_dst.join("sub/b.bin").exists());
        assert!(fw_dst.join("sub").is_dir(), "directories are left");
        assert_eq!(
            sb.read("host-fw/other.bin"),
            "keep",
            "not in the image: left"
        );
        assert_eq!(sb.read("host-fw/shared.bin"), "s", "not copied by it: left");
        assert!(!fw_dst.join(".kmm-fleet/ns.m.files").exists());
    }

    #[test]
    fn firmware_is_never_written_through_a_host_symlink_nor_over_a_foreign_file() {
        let sb = Sandbox::new(&[]);
        let fw_src = sb.root().join("image/fw");
        let fw_dst = sb.root().join("host-fw");
        let elsewhere = sb.root().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, fw_dst.join("sub")).unwrap();
        let env = [
            ("KMM_MODULE_NAME", "m"),
            ("KMM_FIRMWARE_PATH", fw_src.to_str().unwrap()),
            ("KMM_FIRMWARE_HOST_PATH", fw_dst.to_str().unwrap()),
        ];
        let (ok, log) = sb.run(&env, false);
        assert!(!ok, "{log}");
        assert!(log.contains("is a symbolic link"), "{log}");
        assert!(!elsewhere.join("b.bin").exists());
        assert!(sb.calls().is_empty(), "nothing loaded");

        let sb = Sandbox::new(&[]);
        let fw_src = sb.root().join("image/fw");
        let fw_dst = sb.root().join("host-fw");
        std::fs::write(fw_dst.join("a.bin"), "someone else's").unwrap();
        let env = [
            ("KMM_MODULE_NAME", "m"),
            ("KMM_FIRMWARE_PATH", fw_src.to_str().unwrap()),
            ("KMM_FIRMWARE_HOST_PATH", fw_dst.to_str().unwrap()),
        ];
        let (ok, log) = sb.run(&env, false);
        assert!(!ok, "{log}");
        assert!(log.contains("not this module's"), "{log}");
        assert_eq!(sb.read("host-fw/a.bin"), "someone else's");
    }

    #[test]
    fn readiness_asks_the_kernel_for_the_module_and_its_version() {
        let sb = Sandbox::new(&[]);
        let env = [
            ("KMM_MODULE_NAME", "kmm-ci-a"),
            ("FAKE_VERSION", "2.0"),
            ("FAKE_IMAGE_VERSION", "2.0"),
        ];
        assert!(sb.run(&env, false).0);
        assert_eq!(sb.read("tmp/kmm-loaded"), "2.0");
        assert!(sb.check(&env), "live in version 2.0");
        std::fs::write(sb.root().join("sys/module/kmm_ci_a/version"), "1.0\n").unwrap();
        assert!(
            !sb.check(&env),
            "another version in the kernel is not ready"
        );
        std::fs::remove_dir_all(sb.root().join("sys/module/kmm_ci_a")).unwrap();
        assert!(!sb.check(&env), "gone from the kernel is not ready");
    }

    #[test]
    fn an_older_version_still_loaded_is_not_taken_for_the_new_one() {
        let sb = Sandbox::new(&["kmm_ci_a"]);
        std::fs::write(sb.root().join("sys/module/kmm_ci_a/version"), "1.0\n").unwrap();
        let env = [
            ("KMM_MODULE_NAME", "kmm-ci-a"),
            ("FAKE_IMAGE_VERSION", "2.0"),
        ];
        let (ok, log) = sb.run(&env, false);
        assert!(!ok, "{log}");
        assert!(
            log.contains("kmm_ci_a 1.0 is loaded, this image has 2.0"),
            "{log}"
        );
        assert!(sb.calls().is_empty(), "modprobe not run: {:?}", sb.calls());
    }

    #[test]
    fn stopping_reports_whether_the_kernel_still_has_the_module() {
        // The preStop unload failed ("in use"): SIGTERM finds it loaded, exits 3 and says so.
        let sb = Sandbox::new(&[]);
        let env = [("KMM_MODULE_NAME", "kmm-ci-a"), ("FAIL_REMOVE", "kmm-ci-a")];
        assert!(sb.run(&env, false).0);
        let (ok, log) = sb.run(&env, true);
        assert!(!ok && log.contains("in use"), "{log}");
        std::fs::remove_file(sb.root().join("tmp/kmm-loaded")).unwrap();
        let (_, code, log) = sb.run_full(&env, false);
        assert_eq!(code, Some(3), "{log}");
        let msg = sb.read("dev/termination-log");
        assert!(
            msg.starts_with("unload failed: kmm_ci_a is still loaded: modprobe: FATAL: Module kmm_ci_a is in use"),
            "{msg}"
        );
        // Gone from the kernel: SIGTERM exits 0.
        let sb = Sandbox::new(&[]);
        let (_, code, log) = sb.run_full(
            &[("KMM_MODULE_NAME", "kmm-ci-a"), ("FAKE_NO_SYS", "1")],
            false,
        );
        assert_eq!(code, Some(0), "{log}");
    }

    #[test]
    fn a_failing_modprobe_fails_the_container_with_its_message() {
        let sb = Sandbox::new(&[]);
        let (ok, log) = sb.run(&[("KMM_MODULE_NAME", "nope"), ("FAIL_ON", "nope")], false);
        assert!(!ok);
        assert!(log.contains("Module nope not found"), "{log}");
    }
}
