//! Syntax checks for Kubernetes names, label keys/values, image references and paths.
//! Each returns `Err(reason)` with a sentence a person can act on.

use std::sync::LazyLock;

use regex::Regex;

static DNS_LABEL: LazyLock<Regex> = LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"));
static DNS_SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| re(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"));
static LABEL_NAME: LazyLock<Regex> =
    LazyLock::new(|| re(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"));
static KMOD_NAME: LazyLock<Regex> = LazyLock::new(|| re(r"^[A-Za-z0-9_-]+$"));
// The distribution/reference grammar: [domain[:port]/]path[:tag][@digest].
static IMAGE_REF: LazyLock<Regex> = LazyLock::new(|| {
    let alnum = "[a-z0-9]+";
    let sep = r"(?:[._]|__|[-]+)";
    let component = format!("{alnum}(?:{sep}{alnum})*");
    let domain_component = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
    let domain =
        format!(r"(?:{domain_component}(?:\.{domain_component})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?");
    // The grammar's `\w` is ASCII (Go's regexp). Unicode's `\w` under `{0,127}` compiled into
    // a 4.4 MiB automaton that every process kept for its lifetime.
    let tag = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
    let digest = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
    re(&format!(
        r"^(?:{domain}/)?{component}(?:/{component})*(?::{tag})?(?:@{digest})?$"
    ))
});

fn re(s: &str) -> Regex {
    #[allow(clippy::unwrap_used)] // constant patterns, covered by tests
    Regex::new(s).unwrap()
}

/// An RFC 1123 label: namespaces, most object names that become labels.
pub fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 63 {
        return Err(format!("must be at most 63 characters (is {})", s.len()));
    }
    if !DNS_LABEL.is_match(s) {
        return Err(format!(
            "{s:?} is not a valid DNS-1123 label: lower-case letters, digits and '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// An RFC 1123 subdomain: most object names.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 253 {
        return Err(format!("must be at most 253 characters (is {})", s.len()));
    }
    if !DNS_SUBDOMAIN.is_match(s) {
        return Err(format!(
            "{s:?} is not a valid DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A qualified name (`[prefix/]name`): label keys, toleration keys.
pub fn qualified_name(s: &str) -> Result<(), String> {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(p) = prefix {
        dns_subdomain(p).map_err(|e| format!("prefix of {s:?}: {e}"))?;
    }
    if name.is_empty() || name.len() > 63 || !LABEL_NAME.is_match(name) {
        return Err(format!(
            "{s:?} is not a qualified name: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit, with an optional DNS subdomain prefix and '/'"
        ));
    }
    Ok(())
}

/// A label value: empty, or up to 63 alphanumerics, '-', '_' and '.', alphanumeric at both ends.
pub fn label_value(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    if s.len() > 63 || !LABEL_NAME.is_match(s) {
        return Err(format!(
            "{s:?} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A kernel module name as modprobe takes it.
pub fn kmod_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > 55 || !KMOD_NAME.is_match(s) {
        return Err(format!(
            "{s:?} is not a kernel module name: at most 55 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// An image reference (`[registry[:port]/]repository[:tag][@digest]`).
pub fn image_reference(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let name = s.split('@').next().unwrap_or(s);
    let name_len = match (name.rfind(':'), name.rfind('/')) {
        (Some(colon), Some(slash)) if colon > slash => colon,
        (Some(colon), None) => colon,
        _ => name.len(),
    };
    if name_len > 255 {
        return Err(format!(
            "repository name must be at most 255 characters (is {name_len})"
        ));
    }
    if !IMAGE_REF.is_match(s) {
        return Err(format!(
            "{s:?} is not a valid image reference ([registry[:port]/]repository[:tag][@digest], repository in lower case)"
        ));
    }
    Ok(())
}

/// Kernel module names compare with '-' and '_' alike.
pub fn same_kmod(a: &str, b: &str) -> bool {
    a.replace('-', "_") == b.replace('-', "_")
}

/// A lexical clean of an absolute path (like Go's `path.Clean`): `.`, `..` and
/// repeated slashes resolved, no trailing slash.
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether `path` (cleaned) is `dir` or below it.
pub fn path_within(path: &str, dir: &str) -> bool {
    let path = clean_path(path);
    let dir = clean_path(dir);
    dir == "/" || path == dir || path.starts_with(&format!("{dir}/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        for ok in [
            "myrepo.xyz/kmm-labs:kmm-kmod-5.14.0-284.36.1.el9_2.x86_64-v1.0",
            "127.0.0.1:5000/ns/mod:5.14.0",
            "quay.io/ebelarte/kmm-labs:kmm-kmod-1",
            "busybox",
            "localhost:5000/a/b@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "reg/x:tag@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(image_reference(ok), Ok(()), "{ok}");
        }
        for bad in [
            "some.registry/org/<my_kmod>:6.1",
            "Reg/UPPER:1",
            "a::b",
            "",
            "x:",
            "reg/x:tag with space",
            "reg/x:caf\u{e9}",
        ] {
            assert!(image_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_and_labels() {
        assert!(dns_label("labsv2").is_ok());
        assert!(dns_label("<my_kmod>").is_err());
        assert!(dns_label(&"a".repeat(64)).is_err());
        assert!(dns_subdomain("a.b-c").is_ok());
        assert!(qualified_name("node-role.kubernetes.io/worker").is_ok());
        assert!(qualified_name("bad key").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("-x").is_err());
        assert!(kmod_name("kmm_ci-a").is_ok());
        assert!(kmod_name("<my_kmod>").is_err());
        assert!(same_kmod("kmm-ci-a", "kmm_ci_a"));
    }

    #[test]
    fn paths() {
        assert_eq!(clean_path("/dev/../etc"), "/etc");
        assert!(path_within("/dev/dri", "/dev"));
        assert!(!path_within("/devious", "/dev"));
        assert!(!path_within("/dev/../etc", "/dev"));
        assert!(path_within("/opt//lib/./modules", "/opt"));
    }
}
