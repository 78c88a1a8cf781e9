//! A Dockerfile interpreter for the simulated kaniko executor: parses ARG/FROM/WORKDIR/
//! ENV/COPY/ADD/RUN, evaluates multi-stage builds over an in-memory file system, and
//! "compiles" kernel modules by convention (see `docs/test-world.md`, "Simulators").
//!
//! RUN is a small shell: `&&`, `||`, `;`, `cd`, `mkdir`, `cp`, `mv`, `rm`, `touch`,
//! `echo … >`, `exit N`, `false`, `sh -c`, `git clone` (known repositories get their
//! sources), `make` (one `.ko` per `obj-m` entry of the Makefile, vermagic = the kernel);
//! every other command is a no-op that succeeds.

use std::collections::{BTreeMap, BTreeSet};

use crate::kmod;

/// Build arg that makes a build fail on purpose with its value as the reason.
pub const FAIL_ARG: &str = "KMM_SIM_FAIL";
/// Build arg listing (comma or space separated) the modules `make` produces.
pub const MODULES_ARG: &str = "KMM_SIM_MODULES";
/// Dockerfile comment prefix: `# kmm-sim: modules=a,b` lists the modules `make` produces.
pub const MODULES_COMMENT: &str = "kmm-sim:";

/// One Dockerfile instruction: the upper-cased keyword and its argument text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    pub keyword: String,
    pub args: String,
}

/// A Dockerfile: its instructions and the module names a `# kmm-sim: modules=` comment lists.
#[derive(Clone, Debug, Default)]
pub struct Dockerfile {
    pub instructions: Vec<Instruction>,
    pub comment_modules: Vec<String>,
}

/// A file tree: regular files and directories, absolute paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fs {
    pub files: BTreeMap<String, Vec<u8>>,
    pub dirs: BTreeSet<String>,
}

impl Fs {
    pub fn from_files(files: BTreeMap<String, Vec<u8>>) -> Fs {
        let mut fs = Fs::default();
        for (p, d) in files {
            fs.write(&p, d);
        }
        fs
    }

    pub fn mkdir_p(&mut self, path: &str) {
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            acc.push('/');
            acc.push_str(part);
            self.dirs.insert(acc.clone());
        }
    }

    pub fn write(&mut self, path: &str, data: Vec<u8>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.mkdir_p(parent);
        }
        self.files.insert(path.to_string(), data);
    }

    pub fn is_dir(&self, path: &str) -> bool {
        path == "/" || self.dirs.contains(path)
    }

    pub fn exists(&self, path: &str) -> bool {
        self.is_dir(path) || self.files.contains_key(path)
    }

    fn remove(&mut self, path: &str) {
        let sub = format!("{}/", path.trim_end_matches('/'));
        self.files.retain(|p, _| p != path && !p.starts_with(&sub));
        self.dirs.retain(|p| p != path && !p.starts_with(&sub));
    }

    /// Paths (files and dirs) matching a glob pattern or equal to a plain path.
    fn matches(&self, pattern: &str) -> Vec<String> {
        if !pattern.contains(['*', '?', '[']) {
            return if self.exists(pattern) {
                vec![pattern.to_string()]
            } else {
                Vec::new()
            };
        }
        let Ok(pat) = glob::Pattern::new(pattern) else {
            return Vec::new();
        };
        let opts = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        self.files
            .keys()
            .chain(self.dirs.iter())
            .filter(|p| pat.matches_with(p, opts))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Copy `src` (file or directory contents) of `from` to `dest` here.
    fn copy_from(&mut self, from: &Fs, src: &str, dest: &str, dest_is_dir: bool) {
        if from.is_dir(src) {
            self.mkdir_p(dest);
            let prefix = if src == "/" {
                "/".to_string()
            } else {
                format!("{src}/")
            };
            for d in from.dirs.iter().filter(|d| d.starts_with(&prefix)) {
                self.mkdir_p(&join(dest, &d[prefix.len()..]));
            }
            for (p, data) in from.files.iter().filter(|(p, _)| p.starts_with(&prefix)) {
                self.write(&join(dest, &p[prefix.len()..]), data.clone());
            }
        } else if let Some(data) = from.files.get(src) {
            let target = if dest_is_dir {
                join(dest, basename(src))
            } else {
                dest.to_string()
            };
            self.write(&target, data.clone());
        }
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn join(base: &str, rel: &str) -> String {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return base.to_string();
    }
    if base.ends_with('/') {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

/// `path` resolved against `cwd`, normalised (`.`/`..` folded, no trailing `/`).
pub fn resolve(cwd: &str, path: &str) -> String {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{cwd}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in full.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Parse Dockerfile text: comments, blank lines and `\` continuations handled.
pub fn parse(text: &str) -> Result<Dockerfile, String> {
    let mut df = Dockerfile::default();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') {
            if let Some(rest) = line
                .trim_start_matches('#')
                .trim()
                .strip_prefix(MODULES_COMMENT)
                && let Some(list) = rest.trim().strip_prefix("modules=")
            {
                df.comment_modules.extend(split_list(list));
            }
            continue;
        }
        if line.is_empty() && pending.is_none() {
            continue;
        }
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = line.strip_suffix('\\') {
            acc.push_str(body);
            acc.push(' ');
            pending = Some((start, acc));
            continue;
        }
        acc.push_str(line);
        let acc = acc.trim().to_string();
        if acc.is_empty() {
            continue;
        }
        let (kw, args) = acc
            .split_once(char::is_whitespace)
            .unwrap_or((acc.as_str(), ""));
        df.instructions.push(Instruction {
            line: start,
            keyword: kw.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    if let Some((start, acc)) = pending {
        let acc = acc.trim().to_string();
        let (kw, args) = acc
            .split_once(char::is_whitespace)
            .unwrap_or((acc.as_str(), ""));
        df.instructions.push(Instruction {
            line: start,
            keyword: kw.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    }
    if !df.instructions.iter().any(|i| i.keyword == "FROM") {
        return Err("dockerfile has no FROM instruction".to_string());
    }
    Ok(df)
}

fn split_list(s: &str) -> Vec<String> {
    s.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Expand `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` (`\$` escapes). Unset = empty.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' && chars.get(i + 1) == Some(&'$') {
            out.push('$');
            i += 2;
            continue;
        }
        if c != '$' {
            out.push(c);
            i += 1;
            continue;
        }
        if chars.get(i + 1) == Some(&'{') {
            let Some(end) = chars[i + 2..].iter().position(|c| *c == '}') else {
                out.push(c);
                i += 1;
                continue;
            };
            let inner: String = chars[i + 2..i + 2 + end].iter().collect();
            i += end + 3;
            let value = if let Some((name, word)) = inner.split_once(":-") {
                vars.get(name)
                    .filter(|v| !v.is_empty())
                    .cloned()
                    .unwrap_or_else(|| expand(word, vars))
            } else if let Some((name, word)) = inner.split_once(":+") {
                if vars.get(name).is_some_and(|v| !v.is_empty()) {
                    expand(word, vars)
                } else {
                    String::new()
                }
            } else {
                vars.get(&inner).cloned().unwrap_or_default()
            };
            out.push_str(&value);
            continue;
        }
        let name: String = chars[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
            .collect();
        if name.is_empty() {
            out.push('$');
            i += 1;
            continue;
        }
        i += 1 + name.len();
        out.push_str(vars.get(&name).map(String::as_str).unwrap_or(""));
    }
    out
}

/// Split shell-ish words, honouring single/double quotes and backslashes.
pub fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                have = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    cur.push(c);
                }
            }
            '"' => {
                have = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(n) = chars.next() {
                                cur.push(n);
                            }
                        }
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                have = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                have = true;
                cur.push(c);
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// What a build needs besides the Dockerfile.
#[derive(Clone, Debug, Default)]
pub struct BuildParams {
    pub build_args: BTreeMap<String, String>,
    /// The build context (`--context`), as absolute paths inside the context root.
    pub context: Fs,
}

/// The result of a build: the final stage's file system and the build log.
#[derive(Clone, Debug, Default)]
pub struct BuildOutput {
    pub fs: Fs,
    pub log: Vec<String>,
    /// The image the final stage is based on (through earlier stages), whose layers the
    /// pushed image keeps; `None` for `scratch`.
    pub base: Option<BaseKind>,
    /// The files that base image had (the pushed image's own layer holds what differs).
    pub base_files: Fs,
}

/// A failed build: kaniko's error message and the log up to it.
#[derive(Clone, Debug)]
pub struct BuildError {
    pub message: String,
    pub log: Vec<String>,
}

/// How a `FROM`/`COPY --from` image is obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BaseKind {
    /// An earlier stage of this Dockerfile.
    Stage(usize),
    /// `scratch`.
    Scratch,
    /// A simulated public image or Driver Toolkit (empty file system, never pulled).
    Simulated,
    /// An image on a loopback registry: pulled for real.
    Registry(String),
}

/// Global ARG scope: the ARGs declared before the first FROM, with build args applied.
fn global_vars(df: &Dockerfile, args: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for ins in df.instructions.iter().take_while(|i| i.keyword != "FROM") {
        if ins.keyword == "ARG" {
            let (name, default) = arg_decl(&ins.args, &vars);
            let value = args.get(&name).cloned().or(default);
            vars.insert(name, value.unwrap_or_default());
        }
    }
    vars
}

fn arg_decl(args: &str, vars: &BTreeMap<String, String>) -> (String, Option<String>) {
    match args.split_once('=') {
        Some((n, d)) => (n.trim().to_string(), Some(expand(&unquote(d.trim()), vars))),
        None => (args.trim().to_string(), None),
    }
}

fn unquote(s: &str) -> String {
    words(s).join(" ")
}

/// Classify an image reference used by FROM or COPY --from.
pub fn base_kind(image: &str, raw: &str, stages: &[Option<String>]) -> BaseKind {
    if let Some(i) = stages
        .iter()
        .position(|s| s.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(image)))
    {
        return BaseKind::Stage(i);
    }
    if let Ok(i) = image.parse::<usize>()
        && i < stages.len()
    {
        return BaseKind::Stage(i);
    }
    if image.eq_ignore_ascii_case("scratch") {
        return BaseKind::Scratch;
    }
    if raw.contains("DTK_AUTO") || !crate::oci::is_loopback_host(&crate::oci::reference_host(image))
    {
        return BaseKind::Simulated;
    }
    BaseKind::Registry(image.to_string())
}

/// The registry images a build will pull (FROM and COPY --from on loopback hosts).
pub fn registry_images(df: &Dockerfile, args: &BTreeMap<String, String>) -> Vec<String> {
    let globals = global_vars(df, args);
    let mut stages: Vec<Option<String>> = Vec::new();
    let mut out = Vec::new();
    for ins in &df.instructions {
        match ins.keyword.as_str() {
            "FROM" => {
                let (image, name) = from_parts(&ins.args, &globals);
                if let BaseKind::Registry(r) = base_kind(&image, &ins.args, &stages) {
                    out.push(r);
                }
                stages.push(name);
            }
            "COPY" | "ADD" => {
                if let Some(from) = copy_flags(&ins.args, &globals).0
                    && let BaseKind::Registry(r) = base_kind(&from, &from, &stages)
                {
                    out.push(r);
                }
            }
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

fn from_parts(args: &str, globals: &BTreeMap<String, String>) -> (String, Option<String>) {
    let w: Vec<String> = words(args)
        .into_iter()
        .filter(|w| !w.starts_with("--"))
        .collect();
    let image = w.first().map(|i| expand(i, globals)).unwrap_or_default();
    let name = match w.as_slice() {
        [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(expand(name, globals)),
        _ => None,
    };
    (image, name)
}

/// (`--from` value, remaining words) of a COPY/ADD.
fn copy_flags(args: &str, vars: &BTreeMap<String, String>) -> (Option<String>, Vec<String>) {
    let rest: Vec<String> = if args.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<String>>(args.trim()).unwrap_or_default()
    } else {
        words(args)
    };
    let mut from = None;
    let mut out = Vec::new();
    for w in rest {
        if let Some(f) = w.strip_prefix("--from=") {
            from = Some(expand(f, vars));
        } else if w.starts_with("--") && out.is_empty() {
        } else {
            out.push(expand(&w, vars));
        }
    }
    (from, out)
}

struct Stage {
    fs: Fs,
    workdir: String,
    vars: BTreeMap<String, String>,
    /// The image at the root of this stage's `FROM` chain, and its files.
    root: Option<BaseKind>,
    root_files: Fs,
}

/// Run a build. `images` holds the file trees of the registry images
/// [`registry_images`] listed (pulled by the caller).
pub fn build(
    df: &Dockerfile,
    params: &BuildParams,
    images: &BTreeMap<String, Fs>,
) -> Result<BuildOutput, BuildError> {
    let mut log = Vec::new();
    let fail = |message: String, log: &mut Vec<String>| {
        log.push(format!("error building image: {message}"));
        BuildError {
            message: format!("error building image: {message}"),
            log: std::mem::take(log),
        }
    };
    if let Some(reason) = params.build_args.get(FAIL_ARG).filter(|r| !r.is_empty()) {
        return Err(fail(format!("{reason} ({FAIL_ARG})"), &mut log));
    }
    let globals = global_vars(df, &params.build_args);
    let mut names: Vec<Option<String>> = Vec::new();
    let mut done: Vec<Fs> = Vec::new();
    let mut roots: Vec<(Option<BaseKind>, Fs)> = Vec::new();
    let mut cur: Option<Stage> = None;
    let modules_override: Vec<String> = params
        .build_args
        .get(MODULES_ARG)
        .map(|v| split_list(v))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| df.comment_modules.clone());
    for ins in &df.instructions {
        let shown = format!("{} {}", ins.keyword, ins.args);
        match ins.keyword.as_str() {
            "FROM" => {
                let (image, name) = from_parts(&ins.args, &globals);
                if image.is_empty() {
                    return Err(fail(
                        format!(
                            "parsing dockerfile line {}: FROM requires an image ({:?} is empty)",
                            ins.line, ins.args
                        ),
                        &mut log,
                    ));
                }
                if let Some(prev) = cur.take() {
                    done.push(prev.fs);
                    roots.push((prev.root, prev.root_files));
                }
                let kind = base_kind(&image, &ins.args, &names);
                let fs = match &kind {
                    BaseKind::Stage(i) => done.get(*i).cloned().unwrap_or_default(),
                    BaseKind::Scratch | BaseKind::Simulated => Fs::default(),
                    BaseKind::Registry(r) => match images.get(r) {
                        Some(fs) => fs.clone(),
                        None => {
                            return Err(fail(
                                format!("retrieving image {r}: not pulled"),
                                &mut log,
                            ));
                        }
                    },
                };
                let (root, root_files) = match kind {
                    BaseKind::Stage(i) => roots.get(i).cloned().unwrap_or_default(),
                    BaseKind::Scratch => (None, Fs::default()),
                    k => (Some(k), fs.clone()),
                };
                log.push(format!(
                    "INFO Retrieving image {image}; stage {}",
                    names.len()
                ));
                names.push(name);
                cur = Some(Stage {
                    fs,
                    workdir: "/".to_string(),
                    vars: BTreeMap::new(),
                    root,
                    root_files,
                });
            }
            "ARG" => {
                let Some(st) = cur.as_mut() else { continue };
                let (name, default) = arg_decl(&ins.args, &st.vars);
                let value = params
                    .build_args
                    .get(&name)
                    .cloned()
                    .or(default)
                    .or_else(|| globals.get(&name).cloned())
                    .unwrap_or_default();
                st.vars.insert(name, value);
            }
            kw => {
                let Some(st) = cur.as_mut() else {
                    return Err(fail(
                        format!("line {}: {kw} before FROM", ins.line),
                        &mut log,
                    ));
                };
                log.push(format!("INFO {shown}"));
                match kw {
                    "ENV" => {
                        let w = words(&ins.args);
                        if w.len() >= 2 && !w[0].contains('=') {
                            let v = expand(&w[1..].join(" "), &st.vars);
                            st.vars.insert(w[0].clone(), v);
                        } else {
                            for kv in w {
                                if let Some((k, v)) = kv.split_once('=') {
                                    let v = expand(v, &st.vars);
                                    st.vars.insert(k.to_string(), v);
                                }
                            }
                        }
                    }
                    "WORKDIR" => {
                        let dir = resolve(&st.workdir, &expand(&unquote(&ins.args), &st.vars));
                        st.fs.mkdir_p(&dir);
                        st.workdir = dir;
                    }
                    "COPY" | "ADD" => {
                        let (from, mut w) = copy_flags(&ins.args, &st.vars);
                        if w.len() < 2 {
                            return Err(fail(
                                format!("line {}: {kw} requires at least two arguments", ins.line),
                                &mut log,
                            ));
                        }
                        let dest_raw = w.pop().unwrap_or_default();
                        let dest = resolve(&st.workdir, &dest_raw);
                        let src_fs: Fs = match &from {
                            None => params.context.clone(),
                            Some(f) => match base_kind(f, f, &names) {
                                BaseKind::Stage(i) => done.get(i).cloned().unwrap_or_default(),
                                BaseKind::Registry(r) => {
                                    images.get(&r).cloned().unwrap_or_default()
                                }
                                BaseKind::Scratch | BaseKind::Simulated => Fs::default(),
                            },
                        };
                        let dest_is_dir =
                            dest_raw.ends_with('/') || w.len() > 1 || st.fs.is_dir(&dest);
                        let mut copied = 0;
                        for src in &w {
                            let pattern = resolve("/", src);
                            let matched = src_fs.matches(&pattern);
                            if matched.is_empty() {
                                return Err(fail(
                                    format!(
                                        "{shown}: copy failed: no source files matching {pattern}"
                                    ),
                                    &mut log,
                                ));
                            }
                            for m in matched {
                                let multi = dest_is_dir || src.contains(['*', '?', '[']);
                                st.fs.copy_from(&src_fs, &m, &dest, multi);
                                copied += 1;
                            }
                        }
                        log.push(format!("INFO copied {copied} source(s) to {dest}"));
                    }
                    "RUN" => {
                        let argv_form = ins.args.trim_start().starts_with('[');
                        let script = if argv_form {
                            serde_json::from_str::<Vec<String>>(ins.args.trim())
                                .map(|v| {
                                    v.iter()
                                        .map(|w| shell_quote(w))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_else(|_| ins.args.clone())
                        } else {
                            ins.args.clone()
                        };
                        let mut sh = Shell {
                            fs: &mut st.fs,
                            cwd: st.workdir.clone(),
                            vars: st.vars.clone(),
                            build_args: &params.build_args,
                            modules_override: &modules_override,
                            log: &mut log,
                        };
                        let status = sh.run_script(&script, !argv_form);
                        if status != 0 {
                            return Err(fail(
                                format!(
                                    "error building stage: failed to execute command: {shown}: exit status {status}"
                                ),
                                &mut log,
                            ));
                        }
                    }
                    _ => log.push(format!("INFO {kw}: no effect on the file system")),
                }
            }
        }
    }
    let Some(last) = cur else {
        return Err(fail(
            "dockerfile has no FROM instruction".to_string(),
            &mut log,
        ));
    };
    log.push(format!(
        "INFO build complete: {} files",
        last.fs.files.len()
    ));
    Ok(BuildOutput {
        fs: last.fs,
        log,
        base: last.root,
        base_files: last.root_files,
    })
}

fn shell_quote(w: &str) -> String {
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
                "obj-m += simple-kmod.o simple-procfs-kmod.o\n".to_string(),
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

struct Shell<'a> {
    fs: &'a mut Fs,
    cwd: String,
    vars: BTreeMap<String, String>,
    build_args: &'a BTreeMap<String, String>,
    modules_override: &'a [String],
    log: &'a mut Vec<String>,
}

enum Flow {
    Continue(i32),
    Exit(i32),
}

impl Shell<'_> {
    /// Run a script; returns its exit status.
    fn run_script(&mut self, script: &str, expand_vars: bool) -> i32 {
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
                self.fs
                    .write(&format!("/lib/modules/{kernel}/extra/{m}.ko"), ko);
            }
            self.log.push(format!(
                "INFO (simulated) CC [M] {dir}/{m}.o; LD [M] {dir}/{m}.ko (vermagic {kernel})"
            ));
        }
        0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use crate::labs::LAB_DOCKERFILE as LAB;

    const DOCS: &str = r#"ARG DTK_AUTO
FROM ${DTK_AUTO} as builder
ARG KERNEL_VERSION
WORKDIR /usr/src
RUN ["git", "clone", "https://github.com/rh-ecosystem-edge/kernel-module-management.git"]
WORKDIR /usr/src/kernel-module-management/ci/kmm-kmod
RUN KERNEL_SRC_DIR=/lib/modules/${KERNEL_VERSION}/build make all
FROM registry.redhat.io/ubi9/ubi-minimal
ARG KERNEL_VERSION
RUN microdnf install kmod
COPY --from=builder /usr/src/kernel-module-management/ci/kmm-kmod/kmm_ci_a.ko /opt/lib/modules/${KERNEL_VERSION}/
COPY --from=builder /usr/src/kernel-module-management/ci/kmm-kmod/kmm_ci_b.ko /opt/lib/modules/${KERNEL_VERSION}/
RUN depmod -b /opt ${KERNEL_VERSION}
"#;

    fn args(pairs: &[(&str, &str)]) -> BuildParams {
        BuildParams {
            build_args: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn run(text: &str, p: &BuildParams) -> Result<BuildOutput, BuildError> {
        build(&parse(text).unwrap(), p, &BTreeMap::new())
    }

    #[test]
    fn lab_dockerfile_builds_both_modules_for_the_kernel() {
        let k = "5.14.0-284.36.1.el9_2.x86_64";
        let out = run(
            LAB,
            &args(&[("DTK_AUTO", "quay.io/dtk:x"), ("KERNEL_VERSION", k)]),
        )
        .unwrap();
        let files: Vec<&String> = out.fs.files.keys().collect();
        assert_eq!(
            files,
            vec![
                &format!("/opt/lib/modules/{k}/kmm_ci_a.ko"),
                &format!("/opt/lib/modules/{k}/kmm_ci_b.ko")
            ]
        );
        let ko = &out.fs.files[&format!("/opt/lib/modules/{k}/kmm_ci_a.ko")];
        assert_eq!(kmod::vermagic_kernel(ko).unwrap().as_deref(), Some(k));
    }

    #[test]
    fn docs_dockerfile_with_exec_form_and_named_copies() {
        let out = run(
            DOCS,
            &args(&[("DTK_AUTO", "dtk"), ("KERNEL_VERSION", "6.1.0-1")]),
        )
        .unwrap();
        assert!(
            out.fs
                .files
                .contains_key("/opt/lib/modules/6.1.0-1/kmm_ci_a.ko")
        );
        assert!(
            out.fs
                .files
                .contains_key("/opt/lib/modules/6.1.0-1/kmm_ci_b.ko")
        );
    }

    #[test]
    fn empty_dtk_auto_fails_like_a_real_build() {
        let err = run(LAB, &args(&[("KERNEL_VERSION", "6.1.0-1")])).unwrap_err();
        assert!(
            err.message.contains("FROM requires an image"),
            "{}",
            err.message
        );
    }

    #[test]
    fn failure_triggers() {
        let err = run(
            LAB,
            &args(&[
                ("DTK_AUTO", "d"),
                ("KERNEL_VERSION", "k"),
                (FAIL_ARG, "compiler exploded"),
            ]),
        )
        .unwrap_err();
        assert!(err.message.contains("compiler exploded"), "{}", err.message);
        let err = run(
            "FROM scratch\nRUN true && exit 3\n",
            &BuildParams::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("exit status 3"), "{}", err.message);
        let err = run("FROM scratch\nRUN false\n", &BuildParams::default()).unwrap_err();
        assert!(err.message.contains("exit status 1"), "{}", err.message);
        assert!(run("FROM scratch\nRUN false || true\n", &BuildParams::default()).is_ok());
        let err = run(
            "FROM scratch\nWORKDIR /x\nRUN make\n",
            &BuildParams::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("exit status 2"), "{}", err.message);
        let err = run(
            "FROM scratch\nCOPY --from=0 /nope /x/\n",
            &BuildParams::default(),
        )
        .unwrap_err();
        assert!(err.message.contains("no source files"), "{}", err.message);
    }

    #[test]
    fn module_override_and_variables() {
        let text = "# kmm-sim: modules=foo,bar\nARG V=1\nFROM scratch AS b\nARG V\nARG K=${V}-x\nENV D=/src\nWORKDIR $D\nRUN echo hi > Makefile && make KVER=${K}\nFROM b\nRUN cp /src/*.ko /nope/ || mkdir -p /out && cp /src/foo.ko /src/bar.ko /out\n";
        let out = run(text, &BuildParams::default()).unwrap();
        let ko = &out.fs.files["/out/foo.ko"];
        assert_eq!(kmod::vermagic_kernel(ko).unwrap().as_deref(), Some("1-x"));
        assert!(out.fs.files.contains_key("/out/bar.ko"));
        let out = run(
            "FROM scratch\nWORKDIR /w\nRUN touch Makefile && make\n",
            &args(&[(MODULES_ARG, "zz"), ("KERNEL_VERSION", "k1")]),
        )
        .unwrap();
        assert!(out.fs.files.contains_key("/w/zz.ko"));
    }

    #[test]
    fn expansion() {
        let vars: BTreeMap<String, String> = [
            ("A".to_string(), "1".to_string()),
            ("E".to_string(), String::new()),
        ]
        .into();
        assert_eq!(
            expand("$A/${A}/${E:-d}/${A:+y}/${B}/\\$A", &vars),
            "1/1/d/y//$A"
        );
        assert_eq!(
            words(r#"a "b c" 'd e' f\ g"#),
            vec!["a", "b c", "d e", "f g"]
        );
        assert_eq!(resolve("/a/b", "../c/./d/"), "/a/c/d");
    }

    #[test]
    fn registry_bases_are_listed() {
        let df = parse("ARG BASE=127.0.0.1:5000/base:1\nFROM $BASE AS a\nFROM docker.io/x/y\nCOPY --from=a /x /y\nCOPY --from=127.0.0.1:5000/other:2 /z /z\n").unwrap();
        assert_eq!(
            registry_images(&df, &BTreeMap::new()),
            vec!["127.0.0.1:5000/base:1", "127.0.0.1:5000/other:2"]
        );
    }
}
