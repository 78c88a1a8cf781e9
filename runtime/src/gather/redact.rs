//! Scrubbing secrets out of text before it is written to a support bundle: PEM private-key
//! blocks and the credential fields of registry auth files (`auth`, `password`,
//! `identitytoken`, `registrytoken`), in JSON (also JSON quoted inside JSON, as in
//! `last-applied-configuration` annotations) and YAML spelling.

use std::sync::LazyLock;

use regex::Regex;

/// What replaces a secret value.
pub const REDACTED: &str = "[REDACTED]";

// A private key block, also a truncated one (cut off by a log tail) up to the end of the text.
static PEM: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r"(?s)-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
    )
    .ok()
});

// `"password": "…"` and `\"password\":\"…\"` (JSON inside a JSON string).
static JSON_FIELD: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)(\\*")(auth|password|identitytoken|registrytoken)(\\*"\s*:\s*)\\*"(?:[^"\\]|\\[^"])*\\*""#,
    )
    .ok()
});

// `password: …` in YAML or `key=value` log lines.
static YAML_FIELD: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(
        r#"(?im)^(\s*-?\s*)(auth|password|identitytoken|registrytoken)(\s*[:=][ \t]*)\S[^\n]*$"#,
    )
    .ok()
});

/// `text` with every secret-looking value replaced, and how many were replaced.
pub fn redact(text: &str) -> (String, usize) {
    let mut count = 0;
    let mut out = text.to_string();
    if let Some(re) = PEM.as_ref() {
        let n = re.find_iter(&out).count();
        if n > 0 {
            count += n;
            out = re
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    format!(
                        "-----BEGIN {kind}PRIVATE KEY-----{REDACTED}-----END {kind}PRIVATE KEY-----",
                        kind = &c[1]
                    )
                })
                .into_owned();
        }
    }
    if let Some(re) = JSON_FIELD.as_ref() {
        let n = re.find_iter(&out).count();
        if n > 0 {
            count += n;
            out = re
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    let q = &c[1];
                    format!("{q}{}{}{q}{REDACTED}{q}", &c[2], &c[3])
                })
                .into_owned();
        }
    }
    if let Some(re) = YAML_FIELD.as_ref() {
        let n = re.find_iter(&out).count();
        if n > 0 {
            count += n;
            out = re
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    format!("{}{}{}{REDACTED}", &c[1], &c[2], &c[3])
                })
                .into_owned();
        }
    }
    (out, count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n";

    #[test]
    fn private_keys_go_in_every_spelling() {
        let (out, n) = redact(&format!("before\n{KEY}after"));
        assert_eq!(n, 1);
        assert!(!out.contains("MIIEvQ") && out.contains("before") && out.contains("after"));
        assert!(out.contains("-----BEGIN PRIVATE KEY-----[REDACTED]-----END PRIVATE KEY-----"));

        let rsa = KEY.replace("PRIVATE", "RSA PRIVATE");
        let (out, n) = redact(&rsa);
        assert_eq!((n, out.contains("MIIEvQ")), (1, false));

        // Escaped inside a JSON string, twice, and cut off by a log tail.
        let json = serde_json::to_string(&format!("{KEY}{KEY}")).unwrap();
        let (out, n) = redact(&json);
        assert_eq!((n, out.contains("MIIEvQ")), (2, false), "{out}");
        let (out, n) = redact("log: -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI");
        assert_eq!((n, out.contains("MHcCAQEEI")), (1, false));
    }

    #[test]
    fn certificates_and_ordinary_text_stay() {
        let text = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\nauthor: me\nreason: ImagePullBackOff";
        assert_eq!(redact(text), (text.to_string(), 0));
    }

    #[test]
    fn registry_credentials_go() {
        let cfg = r#"{"auths":{"127.0.0.1:5000":{"username":"kmm","password":"s3cr3t","auth":"a21tOnMzY3JldA=="}}}"#;
        let (out, n) = redact(cfg);
        assert_eq!(n, 2, "{out}");
        assert!(
            !out.contains("s3cr") && !out.contains("a21tOnMzY3JldA"),
            "{out}"
        );
        assert!(out.contains(r#""username":"kmm""#), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap();

        // JSON inside a JSON string (an annotation), and YAML.
        let quoted = serde_json::to_string(cfg).unwrap();
        let (out, n) = redact(&quoted);
        assert_eq!(n, 2, "{out}");
        assert!(
            !out.contains("s3cr") && !out.contains("a21tOnMzY3JldA"),
            "{out}"
        );
        serde_json::from_str::<String>(&out).unwrap();
        let (out, n) = redact("auths:\n  r:\n    password: hunter2\n    Auth: 'x'\n");
        assert_eq!(n, 2, "{out}");
        assert!(!out.contains("hunter2"), "{out}");
    }
}
