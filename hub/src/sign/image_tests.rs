use super::*;
use crate::sign::layers::tests::{E, tar_of, test_signer};
use kmm_runtime::ErrorCategory as _;

fn docker_source(layers: &[&[u8]]) -> (OciImageManifest, Vec<u8>) {
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-05-01T10:00:00Z",
        "config": {"Entrypoint": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", hex::encode(Sha256::digest(l)))).collect::<Vec<_>>()},
        "history": layers.iter().map(|_| serde_json::json!({"created_by": "COPY"})).collect::<Vec<_>>(),
    });
    let config = serde_json::to_vec(&config).expect("config");
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE.to_string()),
        config: OciDescriptor {
            media_type: IMAGE_DOCKER_CONFIG_MEDIA_TYPE.to_string(),
            digest: sha256_id(&config),
            size: config.len() as i64,
            ..OciDescriptor::default()
        },
        layers: layers
            .iter()
            .map(|l| OciDescriptor {
                media_type: IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE.to_string(),
                digest: sha256_id(l),
                size: l.len() as i64,
                ..OciDescriptor::default()
            })
            .collect(),
        subject: None,
        artifact_type: None,
        annotations: Some(BTreeMap::from([(
            "org.example/keep".to_string(),
            "yes".to_string(),
        )])),
    };
    (manifest, config)
}

fn patterns() -> FilePatterns {
    FilePatterns::new(&["/opt/lib/modules/*/*.ko".to_string()]).expect("patterns")
}

#[test]
fn plan_appends_one_layer_and_records_the_certificate() {
    let signer = test_signer("image test");
    let base = tar_of(&[E::File("bin/sh", b"shell", 0o755)], false);
    let mods = tar_of(
        &[
            E::File("opt/lib/modules/6.1.0/a.ko", b"module a", 0o644),
            E::File("opt/lib/modules/6.1.0/b.ko", b"module b", 0o644),
        ],
        false,
    );
    let (manifest, config) = docker_source(&[&base, &mods]);
    let plan = plan_signed_image(
        &manifest,
        &config,
        &[&base, &mods],
        &patterns(),
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("plan");

    assert_eq!(plan.kept_layers, 2);
    let m = &plan.manifest;
    assert_eq!(m.media_type.as_deref(), Some(OCI_IMAGE_MEDIA_TYPE));
    assert_eq!(m.config.media_type, IMAGE_CONFIG_MEDIA_TYPE);
    assert_eq!(m.config.digest, sha256_id(&plan.config));
    assert_eq!(m.layers.len(), 3);
    assert!(
        m.layers[..2]
            .iter()
            .all(|l| l.media_type == IMAGE_LAYER_MEDIA_TYPE)
    );
    assert_eq!(
        m.layers[..2].iter().map(|l| &l.digest).collect::<Vec<_>>(),
        manifest
            .layers
            .iter()
            .map(|l| &l.digest)
            .collect::<Vec<_>>()
    );
    assert_eq!(m.layers[2].media_type, IMAGE_LAYER_GZIP_MEDIA_TYPE);
    assert_eq!(m.layers[2].digest, plan.layer.digest);
    assert_eq!(m.layers[2].size, plan.layer.blob.len() as i64);

    let annotations = m.annotations.clone().unwrap_or_default();
    assert_eq!(signed_by(&annotations), Some(signer.cert().sha256_hex()));
    assert!(is_signed_with(&annotations, signer.cert()));
    assert!(!is_signed_with(&annotations, test_signer("other").cert()));
    assert_eq!(
        annotations[SIGNED_FILES_ANNOTATION],
        "/opt/lib/modules/6.1.0/a.ko,/opt/lib/modules/6.1.0/b.ko"
    );
    assert_eq!(annotations["org.example/keep"], "yes");
    assert_eq!(plan.digest, sha256_id(&plan.manifest_bytes));

    let cfg: serde_json::Value = serde_json::from_slice(&plan.config).expect("json");
    assert_eq!(cfg["config"]["Entrypoint"][0], "/bin/sh");
    let diff_ids = cfg["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), 3);
    assert_eq!(diff_ids[2], plan.layer.diff_id.as_str());
    let history = cfg["history"].as_array().expect("history");
    assert_eq!(history.len(), 3);
    assert_eq!(history[2]["created"], "2024-05-01T10:00:00Z");
    assert!(
        history[2]["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with(HISTORY_CREATED_BY))
    );
}

#[test]
fn resigning_a_signed_image_replaces_its_signing_layer() {
    let first = test_signer("first cert");
    let second = test_signer("second cert");
    let mods = tar_of(
        &[E::File("opt/lib/modules/6.1.0/a.ko", b"module a", 0o644)],
        true,
    );
    let (manifest, config) = docker_source(&[&mods]);
    let p = patterns();
    let signed = plan_signed_image(
        &manifest,
        &config,
        &[&mods],
        &p,
        &first,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("first");

    // The signed image as a registry would return it.
    let layers: Vec<&dyn LayerSource> = vec![&mods, &signed.layer.blob];
    let resigned = plan_signed_image(
        &signed.manifest,
        &signed.config,
        &layers,
        &p,
        &second,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("resign");
    assert_eq!(resigned.kept_layers, 1);
    assert_eq!(resigned.manifest.layers.len(), 2);

    // Same result as signing the unsigned image with the new certificate (the source had
    // docker media types, the signed one OCI; everything we write is OCI).
    let direct = plan_signed_image(
        &manifest,
        &config,
        &[&mods],
        &p,
        &second,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect("direct");
    assert_eq!(resigned.layer.digest, direct.layer.digest);
    assert_eq!(resigned.config, direct.config);
    assert_eq!(resigned.digest, direct.digest);
    let annotations = resigned.manifest.annotations.clone().unwrap_or_default();
    assert!(is_signed_with(&annotations, second.cert()));
}

#[test]
fn inconsistent_inputs_are_image_errors() {
    let signer = test_signer("errors");
    let mods = tar_of(&[E::File("opt/lib/modules/6.1.0/a.ko", b"a", 0o644)], false);
    let (manifest, config) = docker_source(&[&mods]);
    let p = patterns();
    let err = plan_signed_image(
        &manifest,
        &config,
        &[],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect_err("err");
    assert_eq!(err.category(), "image");
    let err = plan_signed_image(
        &manifest,
        b"{",
        &[&mods],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect_err("err");
    assert!(err.to_string().contains("config"), "{err}");
    let err = plan_signed_image(
        &manifest,
        b"{}",
        &[&mods],
        &p,
        &signer,
        HashAlgorithm::Sha256,
        &Unpack::default(),
    )
    .expect_err("err");
    assert!(err.to_string().contains("diff_ids"), "{err}");
}

#[test]
fn request_debug_hides_credentials() {
    let signer = test_signer("debug");
    let src: Reference = "127.0.0.1:5000/m/x:1".parse().expect("ref");
    let auth = RegistryAuth::Basic("user".into(), "hunter2-password".into());
    let files = vec!["/opt/*.ko".to_string()];
    let req = ImageSignRequest {
        source: &src,
        source_auth: &auth,
        destination: &src,
        destination_auth: &auth,
        files_to_sign: &files,
        signer: &signer,
        hash: HashAlgorithm::Sha256,
    };
    let text = format!("{req:?}");
    assert!(
        text.contains("127.0.0.1:5000/m/x:1") && text.contains("<redacted>"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
}
