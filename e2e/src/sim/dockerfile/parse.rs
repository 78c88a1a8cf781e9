//! Parsing: instructions, continuation lines, `# kmm-sim:` comments, variable expansion and
//! shell words.

use std::collections::BTreeMap;

use super::MODULES_COMMENT;

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

pub(crate) fn split_list(s: &str) -> Vec<String> {
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

pub(crate) fn unquote(s: &str) -> String {
    words(s).join(" ")
}
