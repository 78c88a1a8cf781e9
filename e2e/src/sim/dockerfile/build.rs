//! Evaluating a multi-stage build: ARG scopes, FROM bases, COPY/ADD, RUN through the shell.

use std::collections::BTreeMap;

use super::fs::{Fs, resolve};
use super::parse::{Dockerfile, expand, split_list, unquote, words};
use super::shell::{Shell, shell_quote};
use super::{FAIL_ARG, MODULES_ARG};

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
