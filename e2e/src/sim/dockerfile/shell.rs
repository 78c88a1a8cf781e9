//! RUN's small shell: `&&`, `||`, `;`, the file commands, `git clone` and `make` by convention.

use std::collections::{BTreeMap, BTreeSet};

use crate::kmod;

use super::fs::{Fs, basename, join, resolve};
use super::parse::{expand, words};

pub(crate) fn shell_quote(w: &str) -> String {
    if w.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Known repositories a simulated `git clone` fills with sources: (URL fragment, files).
fn known_repo(url: &str) -> Vec<(&'static str, String)> {
    if url.contains("kernel-module-management") {
        vec![
            (
                "ci/kmm-kmod/Makefile",
                "obj-m += kmm_ci_a.o kmm_ci_b.o\n".to_string(),
            ),
            ("ci/kmm-kmod/kmm_ci_a.c", "/* kmm_ci_a */\n".to_string()),
            ("ci/kmm-kmod/kmm_ci_b.c", "/* kmm_ci_b */\n".to_string()),
        ]
    } else if url.contains("simple-kmod") {
        vec![
            (
                "Makefile",
                // As upstream's: `make install` puts the modules right in /lib/modules/<KVER>/
                // (which the CoreOS layering Dockerfile copies from), not in extra/.
                "obj-m += simple-kmod.o simple-procfs-kmod.o\n\ninstall:\n\tinstall -v -m 644 simple-kmod.ko /lib/modules/$(KVER)/\n\tinstall -v -m 644 simple-procfs-kmod.ko /lib/modules/$(KVER)/\n".to_string(),
            ),
            ("simple-kmod.c", "/* simple-kmod */\n".to_string()),
            (
                "simple-procfs-kmod.c",
                "/* simple-procfs-kmod */\n".to_string(),
            ),
        ]
    } else {
        Vec::new()
    }
}

pub(crate) struct Shell<'a> {
    pub fs: &'a mut Fs,
    pub cwd: String,
    pub vars: BTreeMap<String, String>,
    pub build_args: &'a BTreeMap<String, String>,
    pub modules_override: &'a [String],
    pub log: &'a mut Vec<String>,
}

enum Flow {
    Continue(i32),
    Exit(i32),
}

impl Shell<'_> {
    /// Run a script; returns its exit status.
    pub fn run_script(&mut self, script: &str, expand_vars: bool) -> i32 {
        // Split on ;, newlines, && and || (outside quotes), keeping the operators.
        let mut parts: Vec<(String, &'static str)> = Vec::new();
        let mut cur = String::new();
        let chars: Vec<char> = script.chars().collect();
        let (mut sq, mut dq) = (false, false);
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '\'' if !dq => sq = !sq,
                '"' if !sq => dq = !dq,
                _ => {}
            }
            if !sq && !dq {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                if two == "&&" || two == "||" {
                    parts.push((
                        std::mem::take(&mut cur),
                        if two == "&&" { "&&" } else { "||" },
                    ));
                    i += 2;
                    continue;
                }
                if c == ';' || c == '\n' {
                    parts.push((std::mem::take(&mut cur), ";"));
                    i += 1;
                    continue;
                }
            }
            cur.push(c);
            i += 1;
        }
        parts.push((cur, ";"));
        let mut status = 0;
        let mut op = ";";
        for (cmd, next) in parts {
            let run = match op {
                "&&" => status == 0,
                "||" => status != 0,
                _ => true,
            };
            op = next;
            if !run || cmd.trim().is_empty() {
                continue;
            }
            let text = if expand_vars {
                expand(&cmd, &self.vars)
            } else {
                cmd.clone()
            };
            match self.command(&text) {
                Flow::Continue(s) => status = s,
                Flow::Exit(s) => return s,
            }
        }
        status
    }

    fn command(&mut self, text: &str) -> Flow {
        // Pipelines: the status is the last command's; the others only print.
        let text = text.rsplit(" | ").next().unwrap_or(text).trim();
        let mut w = words(text);
        let mut redirect: Option<(String, bool)> = None;
        if let Some(pos) = w.iter().position(|x| x == ">" || x == ">>") {
            if let Some(target) = w.get(pos + 1) {
                redirect = Some((resolve(&self.cwd, target), w[pos] == ">>"));
            }
            w.truncate(pos);
        }
        let mut env = BTreeMap::new();
        while let Some(first) = w.first() {
            match first.split_once('=') {
                Some((k, v))
                    if !k.is_empty()
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    env.insert(k.to_string(), v.to_string());
                    w.remove(0);
                }
                _ => break,
            }
        }
        let Some(prog) = w.first().cloned() else {
            self.vars.extend(env);
            return Flow::Continue(0);
        };
        let args: Vec<String> = w[1..].to_vec();
        let name = basename(&prog).to_string();
        let status = match name.as_str() {
            "exit" => return Flow::Exit(args.first().and_then(|a| a.parse().ok()).unwrap_or(0)),
            "false" => 1,
            "true" | ":" => 0,
            "cd" => {
                let dir = resolve(&self.cwd, args.first().map(String::as_str).unwrap_or("/"));
                if self.fs.is_dir(&dir) {
                    self.cwd = dir;
                    0
                } else {
                    self.log
                        .push(format!("sh: cd: {dir}: No such file or directory"));
                    1
                }
            }
            "sh" | "bash" if args.first().is_some_and(|a| a == "-c") => {
                let script = args.get(1).cloned().unwrap_or_default();
                self.run_script(&script, true)
            }
            "mkdir" => {
                for a in args.iter().filter(|a| !a.starts_with('-')) {
                    let d = resolve(&self.cwd, a);
                    self.fs.mkdir_p(&d);
                }
                0
            }
            "touch" => {
                for a in args.iter().filter(|a| !a.starts_with('-')) {
                    let p = resolve(&self.cwd, a);
                    if !self.fs.files.contains_key(&p) {
                        self.fs.write(&p, Vec::new());
                    }
                }
                0
            }
            "rm" => {
                for a in args.iter().filter(|a| !a.starts_with('-')) {
                    for p in self.fs.matches(&resolve(&self.cwd, a)) {
                        self.fs.remove(&p);
                    }
                }
                0
            }
            "cp" | "mv" | "install" => self.copy(&name, &args),
            "echo" | "printf" => {
                if let Some((target, append)) = &redirect {
                    let mut data = if *append {
                        self.fs.files.get(target).cloned().unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    data.extend_from_slice(args.join(" ").as_bytes());
                    data.push(b'\n');
                    self.fs.write(target, data);
                }
                0
            }
            "git" if args.first().is_some_and(|a| a == "clone") => self.git_clone(&args[1..]),
            "make" | "gmake" => self.make(&args, &env),
            "depmod" => self.depmod(&args),
            other => {
                self.log.push(format!("INFO (simulated) {other}: ok"));
                0
            }
        };
        Flow::Continue(status)
    }

    fn copy(&mut self, name: &str, args: &[String]) -> i32 {
        let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
        let [srcs @ .., dest] = paths.as_slice() else {
            self.log.push(format!("{name}: missing file operand"));
            return 1;
        };
        if srcs.is_empty() {
            self.log
                .push(format!("{name}: missing destination file operand"));
            return 1;
        }
        let dest_is_dir = dest.ends_with('/') || srcs.len() > 1;
        let dest = resolve(&self.cwd, dest);
        let dest_is_dir = dest_is_dir || self.fs.is_dir(&dest);
        let snapshot = self.fs.clone();
        for s in srcs {
            let matched = snapshot.matches(&resolve(&self.cwd, s));
            if matched.is_empty() {
                self.log.push(format!(
                    "{name}: cannot stat '{s}': No such file or directory"
                ));
                return 1;
            }
            for m in matched {
                if snapshot.is_dir(&m) {
                    let target = if dest_is_dir {
                        join(&dest, basename(&m))
                    } else {
                        dest.clone()
                    };
                    self.fs.copy_from(&snapshot, &m, &target, true);
                } else {
                    self.fs.copy_from(&snapshot, &m, &dest, dest_is_dir);
                }
                if name == "mv" {
                    self.fs.remove(&m);
                }
            }
        }
        0
    }

    fn git_clone(&mut self, args: &[String]) -> i32 {
        let mut positional = Vec::new();
        let mut skip = false;
        for a in args {
            if skip {
                skip = false;
                continue;
            }
            if matches!(
                a.as_str(),
                "-b" | "--branch" | "--depth" | "-c" | "--config" | "-o" | "--origin"
            ) {
                skip = true;
                continue;
            }
            if !a.starts_with('-') {
                positional.push(a.clone());
            }
        }
        let Some(url) = positional.first() else {
            self.log
                .push("git clone: you must specify a repository to clone".to_string());
            return 128;
        };
        let default_dir = basename(url.trim_end_matches('/'))
            .trim_end_matches(".git")
            .to_string();
        let dir = resolve(&self.cwd, positional.get(1).unwrap_or(&default_dir));
        self.fs.mkdir_p(&dir);
        self.fs
            .write(&join(&dir, ".git/HEAD"), b"ref: refs/heads/main\n".to_vec());
        let files = known_repo(url);
        self.log.push(format!(
            "INFO (simulated) git clone {url} into {dir}: {} source files",
            files.len()
        ));
        for (p, content) in files {
            self.fs.write(&join(&dir, p), content.into_bytes());
        }
        0
    }

    /// `depmod [-b base] [version]`: the real depmod for the real-kernel nodes' kernel (its
    /// indexes are what `modprobe` reads); simulated for other kernels. Without a version
    /// it indexes every kernel directory under the base.
    fn depmod(&mut self, args: &[String]) -> i32 {
        let mut base = "/".to_string();
        let mut versions = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-b" || a == "--basedir" {
                base = it.next().cloned().unwrap_or_default();
            } else if let Some(b) = a.strip_prefix("--basedir=") {
                base = b.to_string();
            } else if let Some(b) = a.strip_prefix("-b").filter(|b| !b.is_empty()) {
                base = b.to_string();
            } else if !a.starts_with('-') {
                versions.push(a.clone());
            }
        }
        let base = resolve(&self.cwd, &base);
        let root = join(&base, "lib/modules");
        if versions.is_empty() {
            versions = self
                .fs
                .files
                .keys()
                .filter_map(|p| p.strip_prefix(&format!("{root}/")))
                .filter_map(|r| r.split('/').next())
                .map(str::to_string)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
        }
        for v in versions {
            if !crate::vm::is_real_kernel(&v) {
                self.log.push(format!("INFO (simulated) depmod {v}: ok"));
                continue;
            }
            match crate::kbuild::depmod(&self.fs.files, &base, &v) {
                Ok(index) => {
                    self.log
                        .push(format!("INFO depmod {v}: {} index files", index.len()));
                    for (p, d) in index {
                        self.fs.write(&p, d);
                    }
                }
                Err(e) => {
                    self.log.push(format!("depmod: {e:#}"));
                    return 1;
                }
            }
        }
        0
    }

    /// `make`: one `.ko` per module of the override list or of the Makefile's `obj-m`.
    fn make(&mut self, args: &[String], env: &BTreeMap<String, String>) -> i32 {
        let mut dir = self.cwd.clone();
        let mut make_vars = env.clone();
        let mut targets = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-C" {
                if let Some(d) = it.next() {
                    dir = resolve(&dir, d);
                }
            } else if let Some(d) = a.strip_prefix("-C") {
                dir = resolve(&dir, d);
            } else if a == "-j" || a == "-f" {
                it.next();
            } else if a.starts_with('-') {
            } else if let Some((k, v)) = a.split_once('=') {
                make_vars.insert(k.to_string(), v.to_string());
            } else {
                targets.push(a.clone());
            }
        }
        // A `-C /lib/modules/<k>/build M=<dir>` invocation builds in M.
        let mut kernel_from_path = None;
        let re_kdir = |s: &str| {
            s.split("/lib/modules/")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .filter(|k| !k.is_empty())
                .map(str::to_string)
        };
        if let Some(k) = re_kdir(&dir) {
            kernel_from_path = Some(k);
            if let Some(m) = make_vars.get("M") {
                dir = resolve(&self.cwd, m);
            }
        }
        for key in ["KERNEL_SRC_DIR", "KERNEL_SRC", "KDIR", "KERNELDIR", "KSRC"] {
            if kernel_from_path.is_none()
                && let Some(v) = make_vars.get(key).or_else(|| self.vars.get(key))
            {
                kernel_from_path = re_kdir(v);
            }
        }
        let kernel = [
            "KVER",
            "KERNELRELEASE",
            "KERNEL_VERSION",
            "KERNEL_FULL_VERSION",
        ]
        .iter()
        .find_map(|k| make_vars.get(*k).filter(|v| !v.is_empty()).cloned())
        .or(kernel_from_path)
        .or_else(|| {
            self.build_args
                .get("KERNEL_VERSION")
                .filter(|v| !v.is_empty())
                .cloned()
        })
        .or_else(|| {
            self.build_args
                .get("KERNEL_FULL_VERSION")
                .filter(|v| !v.is_empty())
                .cloned()
        });
        let modules: Vec<String> = if !self.modules_override.is_empty() {
            self.modules_override.to_vec()
        } else {
            let makefile = ["Makefile", "makefile", "GNUmakefile", "Kbuild"]
                .iter()
                .find_map(|f| self.fs.files.get(&join(&dir, f)))
                .map(|d| String::from_utf8_lossy(d).to_string());
            let Some(makefile) = makefile else {
                self.log.push(
                    "make: *** No targets specified and no makefile found.  Stop.".to_string(),
                );
                return 2;
            };
            makefile
                .lines()
                .filter_map(|l| l.trim().strip_prefix("obj-m"))
                .filter_map(|l| l.split_once('=').map(|(_, r)| r.to_string()))
                .flat_map(|r| r.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .filter_map(|o| o.strip_suffix(".o").map(str::to_string))
                .collect()
        };
        if modules.is_empty() {
            self.log.push(format!(
                "make: Nothing to be done for '{}'.",
                targets.first().map(String::as_str).unwrap_or("all")
            ));
            return 0;
        }
        let Some(kernel) = kernel else {
            self.log.push(
                "make: no kernel version to build for (set build arg KERNEL_VERSION or KVER=…)"
                    .to_string(),
            );
            return 2;
        };
        let install = targets.iter().any(|t| t.contains("install"));
        // Where `make install` puts modules: `/lib/modules/<k>/` when the Makefile's install
        // rule says so, else `extra/` (Kbuild's modules_install default).
        let install_dir = {
            let text = ["Makefile", "makefile", "GNUmakefile"]
                .iter()
                .find_map(|f| self.fs.files.get(&join(&dir, f)))
                .map(|d| String::from_utf8_lossy(d).to_string())
                .unwrap_or_default();
            if text.contains("/lib/modules/$(KVER)/\n") || text.contains("/lib/modules/$(KVER)/ ") {
                format!("/lib/modules/{kernel}")
            } else {
                format!("/lib/modules/{kernel}/extra")
            }
        };
        let real = if crate::vm::is_real_kernel(&kernel) {
            let names: Vec<&str> = modules.iter().map(String::as_str).collect();
            match crate::kbuild::compile(&kernel, &names, crate::kbuild::DEFAULT_VERSION) {
                Ok(r) => r,
                Err(e) => {
                    self.log.push(format!("make: *** {e:#}"));
                    return 2;
                }
            }
        } else {
            BTreeMap::new()
        };
        for m in &modules {
            let ko = match real.get(&m.replace('-', "_")) {
                Some(ko) => {
                    self.log.push(format!(
                        "INFO CC [M] {dir}/{m}.o; LD [M] {dir}/{m}.ko (compiled against linux-headers-{kernel})"
                    ));
                    ko.clone()
                }
                None => kmod::fake_module(m, &kernel),
            };
            self.fs.write(&join(&dir, &format!("{m}.ko")), ko.clone());
            if install {
                self.fs.write(&format!("{install_dir}/{m}.ko"), ko);
            }
            self.log.push(format!(
                "INFO (simulated) CC [M] {dir}/{m}.o; LD [M] {dir}/{m}.ko (vermagic {kernel})"
            ));
        }
        0
    }
}
