//! A Dockerfile interpreter for the simulated kaniko executor: parses ARG/FROM/WORKDIR/
//! ENV/COPY/ADD/RUN, evaluates multi-stage builds over an in-memory file system, and
//! "compiles" kernel modules by convention (see `docs/test-world.md`, "Simulators").
//!
//! RUN is a small shell: `&&`, `||`, `;`, `cd`, `mkdir`, `cp`, `mv`, `rm`, `touch`,
//! `echo … >`, `exit N`, `false`, `sh -c`, `git clone` (known repositories get their
//! sources), `make` (one `.ko` per `obj-m` entry of the Makefile, vermagic = the kernel);
//! every other command is a no-op that succeeds.

mod build;
mod fs;
mod parse;
mod shell;

pub use build::{
    BaseKind, BuildError, BuildOutput, BuildParams, base_kind, build, registry_images,
};
pub use fs::{Fs, resolve};
pub use parse::{Dockerfile, Instruction, expand, parse, words};

/// Build arg that makes a build fail on purpose with its value as the reason.
pub const FAIL_ARG: &str = "KMM_SIM_FAIL";

/// Build arg listing (comma or space separated) the modules `make` produces.
pub const MODULES_ARG: &str = "KMM_SIM_MODULES";

/// Dockerfile comment prefix: `# kmm-sim: modules=a,b` lists the modules `make` produces.
pub const MODULES_COMMENT: &str = "kmm-sim:";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::kmod;

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
