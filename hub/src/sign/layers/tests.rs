use super::signing_layer::sha256_id;
use super::*;
use crate::sign::signature_info;
use kmm_runtime::ErrorCategory as _;

/// A throwaway RSA signer made with openssl (keys are never committed).
pub(crate) fn test_signer(cn: &str) -> Signer {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-days", "30",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-keyout", "k.pem", "-out", "c.pem"])
        .current_dir(dir.path())
        .output()
        .expect("openssl");
    assert!(status.status.success(), "{status:?}");
    let key = std::fs::read(dir.path().join("k.pem")).expect("key");
    let cert = std::fs::read(dir.path().join("c.pem")).expect("cert");
    Signer::from_pem_or_der(&key, &cert).expect("signer")
}

pub(crate) enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
    Symlink(&'a str, &'a str),
}

pub(crate) fn tar_of(entries: &[E<'_>], gzip: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o750);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).expect("dir");
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).expect("file");
            }
            E::Link(p, target) | E::Symlink(p, target) => {
                let kind = if matches!(e, E::Link(..)) {
                    tar::EntryType::Link
                } else {
                    tar::EntryType::Symlink
                };
                h.set_entry_type(kind);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("link");
            }
        }
    }
    let tar = b.into_inner().expect("tar");
    if !gzip {
        return tar;
    }
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&tar).expect("gzip");
    gz.finish().expect("gzip")
}

fn patterns(p: &[&str]) -> FilePatterns {
    FilePatterns::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("patterns")
}

/// Entries of the signing layer: path -> (type, mode, data).
fn read_signing_layer(blob: &[u8]) -> BTreeMap<String, (tar::EntryType, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(GzDecoder::new(blob));
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read");
        let h = e.header();
        out.insert(path, (h.entry_type(), h.mode().expect("mode"), data));
    }
    out
}

#[test]
fn patterns_must_be_absolute_and_valid() {
    let err = |p: &[&str]| {
        FilePatterns::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .err()
            .map(|e| (e.category(), e.to_string()))
    };
    assert!(
        err(&["lib/modules/x.ko"]).is_some_and(|(c, m)| c == "pattern" && m.contains("absolute"))
    );
    assert!(err(&["/opt/[x.ko"]).is_some_and(|(c, m)| c == "pattern" && m.contains("/opt/[x.ko")));
    assert!(err(&["/opt/"]).is_some());
    assert!(err(&[]).is_some());
    let p = patterns(&["/opt/lib/modules/*/kmm_ci_?.ko", "/bin/[gs]etconf"]);
    assert!(p.matches("/opt/lib/modules/6.1.0/kmm_ci_a.ko"));
    assert!(
        !p.matches("/opt/lib/modules/6.1.0/extra/kmm_ci_a.ko"),
        "* crosses /"
    );
    assert!(!p.matches("/opt/lib/modules/6.1.0/kmm_ci_ab.ko"));
    assert!(p.matches("/bin/getconf") && p.matches("/bin/setconf") && !p.matches("/bin/tetconf"));
    let dot = patterns(&["/m/*.ko"]);
    assert!(!dot.matches("/m/.hidden.ko"), "* matches a leading dot");
}

#[test]
fn merge_honours_whiteouts_opaque_dirs_and_replacements() {
    let base = tar_of(
        &[
            E::Dir("opt/"),
            E::Dir("opt/lib/modules/6.1/"),
            E::File("opt/lib/modules/6.1/a.ko", b"A", 0o644),
            E::File("opt/lib/modules/6.1/b.ko", b"B", 0o644),
            E::File("./opt/lib/modules/6.1/.hidden.ko", b"H", 0o644),
            E::File("opt/old/x.ko", b"X", 0o644),
            E::File("opt/old/sub/y.ko", b"Y", 0o644),
            E::File("opt/gone/z.ko", b"Z", 0o644),
            E::File("opt/lib/modules/6.1/link-target.ko", b"T", 0o600),
            E::Symlink("opt/lib/modules/6.1/sym.ko", "a.ko"),
        ],
        true,
    );
    let upper = tar_of(
        &[
            E::File("opt/lib/modules/6.1/.wh.b.ko", b"", 0o644),
            E::File("opt/lib/modules/6.1/c.ko", b"C", 0o600),
            // Opaque: lower contents of opt/old vanish, this layer's stay.
            E::File("opt/old/new.ko", b"N", 0o644),
            E::File("opt/old/.wh..wh..opq", b"", 0o644),
            E::File("opt/.wh.gone", b"", 0o644),
            E::Link(
                "opt/lib/modules/6.1/hard.ko",
                "opt/lib/modules/6.1/link-target.ko",
            ),
        ],
        false,
    );
    let p = patterns(&["/opt/**/*.ko"]);
    let tree = MergedTree::from_layers(&[&base, &upper], &p, &Unpack::default()).expect("merge");
    let files: Vec<&str> = tree.files().collect();
    assert_eq!(
        files,
        [
            "/opt/lib/modules/6.1/.hidden.ko",
            "/opt/lib/modules/6.1/a.ko",
            "/opt/lib/modules/6.1/c.ko",
            "/opt/lib/modules/6.1/hard.ko",
            "/opt/lib/modules/6.1/link-target.ko",
            "/opt/old/new.ko",
        ]
    );
    // A hard link carries its target's contents and mode.
    let hard = tree
        .nodes
        .get("/opt/lib/modules/6.1/hard.ko")
        .expect("hard");
    assert!(matches!(&hard.kind, Kind::File(Some(d)) if d == b"T"));
    assert_eq!(hard.meta.mode, 0o600);

    // A file replacing a directory hides what was below it.
    let replace = tar_of(&[E::File("opt/lib", b"file now", 0o644)], false);
    let tree =
        MergedTree::from_layers(&[&base, &upper, &replace], &p, &Unpack::default()).expect("merge");
    assert_eq!(
        tree.files().collect::<Vec<_>>(),
        ["/opt/lib", "/opt/old/new.ko"]
    );
}

#[test]
fn hard_link_to_an_unmatched_file_is_resolved() {
    let layer = tar_of(
        &[
            E::File("usr/share/real.bin", b"REAL", 0o644),
            E::Link("opt/lib/modules/m.ko", "usr/share/real.bin"),
        ],
        false,
    );
    let p = patterns(&["/opt/lib/modules/*.ko"]);
    let tree = MergedTree::from_layers(&[&layer], &p, &Unpack::default()).expect("merge");
    let node = tree.nodes.get("/opt/lib/modules/m.ko").expect("link");
    assert!(matches!(&node.kind, Kind::File(Some(d)) if d == b"REAL"));
}

#[test]
fn signing_layer_holds_signed_copies_with_parents() {
    let signer = test_signer("layer test");
    let base = tar_of(
        &[
            E::Dir("opt/"),
            E::Dir("opt/lib/"),
            E::File("opt/lib/a.ko", b"module a", 0o640),
            E::File("opt/lib/notes.txt", b"not signed", 0o644),
            E::File("opt/lib/b.ko", b"module b", 0o644),
            E::Symlink("opt/lib/sym.ko", "a.ko"),
        ],
        true,
    );
    let p = patterns(&["/opt/lib/*.ko"]);
    let layer = build_signing_layer(
        &[&base],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("layer");
    assert_eq!(layer.files, ["/opt/lib/a.ko", "/opt/lib/b.ko"]);
    let entries = read_signing_layer(&layer.blob);
    assert_eq!(
        entries.keys().map(String::as_str).collect::<Vec<_>>(),
        ["opt/", "opt/lib/", "opt/lib/a.ko", "opt/lib/b.ko"]
    );
    let (kind, mode, data) = &entries["opt/lib/a.ko"];
    assert_eq!((*kind, *mode), (tar::EntryType::Regular, 0o640));
    assert_eq!(entries["opt/lib/"].1, 0o750, "parent directory mode kept");
    assert_eq!(strip_signature_ok(data), b"module a");
    let info = signature_info(data).expect("info").expect("signed");
    assert_eq!(info.signer.as_deref(), Some("layer test"));

    // The uncompressed tar is what diff_id names; the blob is what digest names.
    let mut tar = Vec::new();
    GzDecoder::new(layer.blob.as_slice())
        .read_to_end(&mut tar)
        .expect("gunzip");
    assert_eq!(layer.diff_id, sha256_id(&tar));
    assert_eq!(layer.digest, sha256_id(&layer.blob));

    // Deterministic, and a signed input is re-signed from its unsigned contents.
    let again = build_signing_layer(
        &[&base],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("layer");
    assert_eq!(again.digest, layer.digest);
    let signed_on_top = tar_of(&[E::File("opt/lib/a.ko", data, 0o640)], false);
    let resigned = build_signing_layer(
        &[&base, &signed_on_top],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("layer");
    assert_eq!(read_signing_layer(&resigned.blob)["opt/lib/a.ko"].2, *data);
}

fn strip_signature_ok(data: &[u8]) -> &[u8] {
    crate::sign::strip_signature(data).expect("strip")
}

#[test]
fn unmatched_pattern_is_named() {
    let signer = test_signer("nomatch");
    let base = tar_of(
        &[
            E::File("opt/lib/a.ko", b"a", 0o644),
            E::Symlink("opt/lib/s.ko", "a.ko"),
        ],
        false,
    );
    let p = patterns(&["/opt/lib/*.ko", "/opt/extra/*.ko"]);
    let err = build_signing_layer(
        &[&base],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect_err("error");
    assert_eq!(err.category(), "pattern");
    assert!(err.to_string().contains("/opt/extra/*.ko"), "{err}");
    // A symlink alone does not count as a match.
    let p = patterns(&["/opt/lib/s.ko"]);
    assert!(
        build_signing_layer(
            &[&base],
            &p,
            &signer,
            HashAlgorithm::Sha256,
            &Unpack::default()
        )
        .is_err()
    );
}

#[test]
fn limits_stop_bombs_entry_floods_and_oversized_modules() {
    use crate::sign::limits::SignLimits;
    let p = patterns(&["/opt/*.ko"]);
    let unpack = |limits: SignLimits| Unpack {
        image: "reg/bomb:1".into(),
        limits,
    };
    // 64 MiB of zeros gzip to ~64 KiB: the unpacked size trips, not the download size.
    let zeros = vec![0u8; 64 << 20];
    let bomb = tar_of(
        &[
            E::File("filler", &zeros, 0o644),
            E::File("opt/a.ko", b"a", 0o644),
        ],
        true,
    );
    assert!(bomb.len() < 1 << 20);
    let err = MergedTree::from_layers(
        &[&bomb],
        &p,
        &unpack(SignLimits {
            max_unpacked_bytes: 16 << 20,
            ..SignLimits::default()
        }),
    )
    .expect_err("bomb");
    assert_eq!(err.category(), "limit");
    assert_eq!(err.status_reason(), Some("SignLimitExceeded"));
    let text = err.to_string();
    assert!(
        text.contains("--sign-max-unpacked-bytes")
            && text.contains("16 MiB")
            && text.contains("reg/bomb:1")
            && text.contains("layer 0"),
        "{text}"
    );
    // Within the limit it unpacks.
    assert!(MergedTree::from_layers(&[&bomb], &p, &unpack(SignLimits::default())).is_ok());

    // Entries are counted over all layers.
    let many: Vec<String> = (0..50).map(|i| format!("etc/f{i}")).collect();
    let entries: Vec<E<'_>> = many.iter().map(|n| E::File(n, b"x", 0o644)).collect();
    let flood = tar_of(&entries, false);
    let err = MergedTree::from_layers(
        &[&flood, &flood],
        &p,
        &unpack(SignLimits {
            max_entries: 80,
            ..SignLimits::default()
        }),
    )
    .expect_err("flood");
    assert!(err.to_string().contains("--sign-max-entries"), "{err}");
    assert!(err.to_string().contains("layer 1"), "{err}");

    // Matched files are held in memory: their total is capped before they are read.
    let module = vec![7u8; 3000];
    let mods = tar_of(
        &[
            E::File("opt/a.ko", &module, 0o644),
            E::File("opt/b.ko", &module, 0o644),
        ],
        false,
    );
    let err = MergedTree::from_layers(
        &[&mods],
        &p,
        &unpack(SignLimits {
            max_signed_bytes: 5000,
            ..SignLimits::default()
        }),
    )
    .expect_err("too big");
    assert!(
        err.to_string().contains("--sign-max-signed-bytes")
            && err.to_string().contains("/opt/b.ko"),
        "{err}"
    );
}

#[test]
fn zstd_and_garbage_layers_are_image_errors() {
    let p = patterns(&["/x"]);
    let zstd = vec![0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
    let err = MergedTree::from_layers(&[&zstd], &p, &Unpack::default()).expect_err("error");
    assert_eq!(err.category(), "image");
    assert!(err.to_string().contains("zstd"));
    let garbage = vec![7u8; 1024];
    assert!(MergedTree::from_layers(&[&garbage], &p, &Unpack::default()).is_err());
}
