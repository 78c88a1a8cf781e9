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
        msg.starts_with(
            "unload failed: kmm_ci_a is still loaded: modprobe: FATAL: Module kmm_ci_a is in use"
        ),
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
