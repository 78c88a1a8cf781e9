use super::*;

#[test]
fn object_paths_stay_inside_the_bundle() {
    assert_eq!(
        object_path("ManifestWork", Some("spoke-1"), "labs-a"),
        "manifestwork/spoke-1/labs-a.yaml"
    );
    assert_eq!(object_path("Node", None, "n1"), "node/_cluster/n1.yaml");
    assert_eq!(object_path("Pod", Some(".."), "../x"), "pod/_../.._x.yaml");
}

#[test]
fn a_bundle_is_laid_out_redacted_summarised_and_tarred() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("must-gather");
    let mut b = Bundle::create(&root, "kmm-hub must-gather").unwrap();
    b.write_yaml(
        &object_path("ConfigMap", Some("kmm-hub"), "cfg"),
        &serde_json::json!({"data": {"k": "-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----"}}),
    );
    b.write_text("logs/kmm-hub/p/c.log", "password=hunter2\nready\n");
    b.error(
        "listing ManagedCluster",
        "the server could not find the requested resource",
    );
    b.note("ManagedClusterModule: 1");
    let w = b.finish(true).unwrap();
    assert_eq!((w.errors, w.redactions, w.files), (1, 2, 4));

    let cm = std::fs::read_to_string(root.join("configmap/kmm-hub/cfg.yaml")).unwrap();
    assert!(!cm.contains("QUJD") && cm.contains("[REDACTED]"), "{cm}");
    let log = std::fs::read_to_string(root.join("logs/kmm-hub/p/c.log")).unwrap();
    assert_eq!(log, "password=[REDACTED]\nready\n");
    let errors = std::fs::read_to_string(root.join("errors.txt")).unwrap();
    assert!(errors.contains("listing ManagedCluster: the server could not find"));
    let summary = std::fs::read_to_string(root.join("summary.txt")).unwrap();
    for want in [
        "kmm-hub must-gather",
        "redacted values: 2",
        "errors: 1",
        "ManagedClusterModule: 1",
        "  configmap/kmm-hub/cfg.yaml",
        "  errors.txt",
    ] {
        assert!(summary.contains(want), "{want} not in {summary}");
    }

    // The tarball holds the same files under the directory's name.
    let tarball = w.tarball.unwrap();
    assert_eq!(tarball, dir.path().join("must-gather.tar.gz"));
    let mut names: Vec<String> = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&tarball).unwrap(),
    ))
    .entries()
    .unwrap()
    .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
    .filter(|p| p.ends_with(".yaml") || p.ends_with(".txt") || p.ends_with(".log"))
    .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "must-gather/configmap/kmm-hub/cfg.yaml",
            "must-gather/errors.txt",
            "must-gather/logs/kmm-hub/p/c.log",
            "must-gather/summary.txt"
        ]
    );
}

#[test]
fn secrets_keep_only_name_type_and_keys() {
    use k8s_openapi::ByteString;
    let s = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("pull".into()),
            namespace: Some("kmm-hub".into()),
            annotations: Some([("a".to_string(), "hunter2".to_string())].into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                ByteString(b"hunter2".to_vec()),
            )]
            .into(),
        ),
        string_data: Some([("extra".to_string(), "hunter2".to_string())].into()),
        ..Default::default()
    };
    let v = collect::reduce_secret(s);
    assert!(!v.to_string().contains("hunter2"), "{v}");
    assert_eq!(
        v,
        serde_json::json!({"name": "pull", "namespace": "kmm-hub",
            "type": "kubernetes.io/dockerconfigjson", "keys": [".dockerconfigjson", "extra"]})
    );
}

#[test]
fn the_output_flag_wins() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        g: GatherArgs,
    }
    let c = Cli::try_parse_from(["x", "--output", "/tmp/b", "--tar", "--since", "30m"]).unwrap();
    assert_eq!(c.g.output_dir(), PathBuf::from("/tmp/b"));
    assert!(c.g.tar);
    assert_eq!(since_seconds(c.g.since), Some(1800));
}

#[test]
fn started_as_gather_it_gathers() {
    let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
    assert_eq!(
        argv("kmm-hub", os(&["/usr/bin/gather"])),
        os(&["kmm-hub", "must-gather"])
    );
    assert_eq!(
        argv("kmm-spoke", os(&["gather", "--since", "1h"])),
        os(&["kmm-spoke", "must-gather", "--since", "1h"])
    );
    assert_eq!(
        argv("kmm-hub", os(&["/usr/bin/kmm-hub", "run"])),
        os(&["/usr/bin/kmm-hub", "run"])
    );
}
