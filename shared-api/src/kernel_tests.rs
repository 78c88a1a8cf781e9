use super::*;
use crate::module::{KernelMapping, LocalObjectReference};

fn mapping_lit(lit: &str, img: &str) -> KernelMapping {
    KernelMapping {
        literal: Some(lit.into()),
        container_image: img.into(),
        ..Default::default()
    }
}
fn mapping_re(re: &str, img: &str) -> KernelMapping {
    KernelMapping {
        regexp: Some(re.into()),
        container_image: img.into(),
        ..Default::default()
    }
}
fn container(mappings: Vec<KernelMapping>) -> ModuleLoaderContainerSpec {
    ModuleLoaderContainerSpec {
        kernel_mappings: mappings,
        ..Default::default()
    }
}

#[test]
fn literal_beats_a_later_regexp() {
    let c = container(vec![
        mapping_lit("6.0.15-300.fc37.x86_64", "r/lit:1"),
        mapping_re("^.+$", "r/re:1"),
    ]);
    let m = KernelMapper::new(&c).unwrap();
    let r = m
        .resolve("6.0.15-300.fc37.x86_64", "m", "ns")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.mapping_index, r.container_image.as_str()),
        (0, "r/lit:1")
    );
}

#[test]
fn first_matching_regexp_wins_and_is_unanchored() {
    let c = container(vec![
        mapping_re("fc37", "r/a:${KERNEL_FULL_VERSION}"),
        mapping_re("^.+$", "r/b:${KERNEL_FULL_VERSION}"),
    ]);
    let m = KernelMapper::new(&c).unwrap();
    assert_eq!(
        m.resolve("6.0.15-300.fc37.x86_64", "m", "ns")
            .unwrap()
            .unwrap()
            .container_image,
        "r/a:6.0.15-300.fc37.x86_64"
    );
    assert_eq!(
        m.resolve("5.14.0-1.el9.x86_64", "m", "ns")
            .unwrap()
            .unwrap()
            .mapping_index,
        1
    );
    let anchored = container(vec![mapping_re("^fc37$", "r/a:1")]);
    assert_eq!(
        KernelMapper::new(&anchored)
            .unwrap()
            .find("6.0.15-300.fc37.x86_64"),
        None
    );
}

#[test]
fn no_match_is_none() {
    let c = container(vec![mapping_re(r"^5\.14.*$", "r/x:1")]);
    assert_eq!(
        KernelMapper::new(&c)
            .unwrap()
            .resolve("5.15.0-2", "m", "ns")
            .unwrap(),
        None
    );
}

#[test]
fn variables_including_xyz() {
    let v = Variables::new("5.14.0-284.36.1.el9_2.x86_64", "kmm-ci-a", "spoke-ns");
    assert_eq!(v.substitute("${KERNEL_XYZ}").unwrap(), "5.14.0");
    assert_eq!(
        v.substitute("$KERNEL_X.$KERNEL_Y.${KERNEL_Z}").unwrap(),
        "5.14.0"
    );
    assert_eq!(
        v.substitute("reg/$MOD_NAMESPACE/$MOD_NAME:${KERNEL_FULL_VERSION}")
            .unwrap(),
        "reg/spoke-ns/kmm-ci-a:5.14.0-284.36.1.el9_2.x86_64"
    );
    assert_eq!(
        v.substitute("$KERNEL_VERSION").unwrap(),
        "5.14.0-284.36.1.el9_2.x86_64"
    );
    assert_eq!(v.substitute("a$$b").unwrap(), "a$b");
}

#[test]
fn trailing_plus_is_trimmed_before_matching_and_substitution() {
    let c = container(vec![mapping_lit("6.6.0-rc1", "r/x:${KERNEL_FULL_VERSION}")]);
    let r = KernelMapper::new(&c)
        .unwrap()
        .resolve("6.6.0-rc1+", "m", "ns")
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.kernel.as_str(), r.container_image.as_str()),
        ("6.6.0-rc1", "r/x:6.6.0-rc1")
    );
}

#[test]
fn a_raspberry_pi_kernel_is_matched_and_built_raw_and_tagged_normalised() {
    let k = "6.6.31+rpt-rpi-v8";
    for c in [
        container(vec![mapping_lit(k, "r/x:${KERNEL_FULL_VERSION}")]),
        container(vec![mapping_re(
            r"^6\.6\.31\+rpt-rpi-v8$",
            "r/x:${KERNEL_FULL_VERSION}",
        )]),
    ] {
        let mut c = c;
        c.kernel_mappings[0].sign = Some(Sign {
            unsigned_image: Some("r/u:${KERNEL_FULL_VERSION}".into()),
            files_to_sign: vec!["/opt/lib/modules/${KERNEL_FULL_VERSION}/m.ko".into()],
            ..Default::default()
        });
        let r = KernelMapper::new(&c)
            .unwrap()
            .resolve(k, "m", "ns")
            .unwrap()
            .expect("the raw kernel matches");
        assert_eq!(r.kernel, k, "shipped raw");
        assert_eq!(r.container_image, "r/x:6.6.31_rpt-rpi-v8");
        let s = r.sign.unwrap();
        assert_eq!(s.unsigned_image.as_deref(), Some("r/u:6.6.31_rpt-rpi-v8"));
        assert_eq!(s.files_to_sign, vec![format!("/opt/lib/modules/{k}/m.ko")]);
    }
    let args = build_args_for(&Build::default(), &Variables::new(k, "m", "ns"));
    assert_eq!(args["KERNEL_FULL_VERSION"], k);
    assert_eq!(args["KERNEL_VERSION"], k);
}

#[test]
fn unknown_variable_and_malformed_kernel_are_errors() {
    let v = Variables::new("5.14.0-1", "m", "ns");
    assert_eq!(
        v.substitute("${NOPE}"),
        Err(SubstError::Unknown("NOPE".into()))
    );
    assert!(matches!(
        v.substitute("${KERNEL"),
        Err(SubstError::Unterminated(_))
    ));
    let bad = Variables::new("6", "m", "ns");
    assert!(matches!(
        bad.substitute("$KERNEL_XYZ"),
        Err(SubstError::MalformedKernel { .. })
    ));
    assert_eq!(bad.substitute("$KERNEL_FULL_VERSION").unwrap(), "6");
    let c = container(vec![mapping_re(".*", "r/x:$UNKNOWN")]);
    let err = KernelMapper::new(&c)
        .unwrap()
        .resolve("5.14.0-1", "m", "ns")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("kernelMappings[0].containerImage: unknown variable ${UNKNOWN}"),
        "{err}"
    );
}

#[test]
fn mapping_values_override_container_defaults() {
    let mut c = container(vec![KernelMapping {
        regexp: Some(".*".into()),
        container_image: "r/x:1".into(),
        build: Some(Build {
            build_args: vec![
                BuildArg {
                    name: "A".into(),
                    value: "mapping".into(),
                },
                BuildArg {
                    name: "C".into(),
                    value: "3".into(),
                },
            ],
            secrets: vec![LocalObjectReference::new("s2")],
            ..Default::default()
        }),
        sign: Some(Sign {
            files_to_sign: vec!["/opt/b.ko".into()],
            key_secret: Some(LocalObjectReference::new("k2")),
            ..Default::default()
        }),
        registry_tls: Some(TlsOptions {
            insecure: true,
            insecure_skip_tls_verify: false,
        }),
        in_tree_modules_to_remove: Some(vec!["mapped".into()]),
        ..Default::default()
    }]);
    c.build = Some(Build {
        build_args: vec![
            BuildArg {
                name: "A".into(),
                value: "container".into(),
            },
            BuildArg {
                name: "B".into(),
                value: "2".into(),
            },
        ],
        dockerfile_config_map: Some(LocalObjectReference::new("df")),
        secrets: vec![LocalObjectReference::new("s1")],
        ..Default::default()
    });
    c.sign = Some(Sign {
        files_to_sign: vec!["/opt/a-$KERNEL_X.ko".into()],
        key_secret: Some(LocalObjectReference::new("k1")),
        cert_secret: Some(LocalObjectReference::new("c1")),
        ..Default::default()
    });
    c.registry_tls = Some(TlsOptions {
        insecure: false,
        insecure_skip_tls_verify: true,
    });
    c.in_tree_module_to_remove = Some("container".into());
    let r = KernelMapper::new(&c)
        .unwrap()
        .resolve("5.14.0-1", "m", "ns")
        .unwrap()
        .unwrap();
    let b = r.build.unwrap();
    let args: Vec<(&str, &str)> = b
        .build_args
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str()))
        .collect();
    assert_eq!(args, vec![("A", "mapping"), ("B", "2"), ("C", "3")]);
    assert_eq!(
        b.dockerfile_config_map,
        Some(LocalObjectReference::new("df"))
    );
    assert_eq!(
        b.secrets,
        vec![
            LocalObjectReference::new("s1"),
            LocalObjectReference::new("s2")
        ]
    );
    let s = r.sign.unwrap();
    assert_eq!(
        s.files_to_sign,
        vec!["/opt/a-5.ko".to_string(), "/opt/b.ko".to_string()]
    );
    assert_eq!(s.key_secret, Some(LocalObjectReference::new("k2")));
    assert_eq!(s.cert_secret, Some(LocalObjectReference::new("c1")));
    assert!(r.registry_tls.insecure && !r.registry_tls.insecure_skip_tls_verify);
    assert_eq!(r.in_tree_modules_to_remove, vec!["mapped".to_string()]);
}

#[test]
fn container_image_fallback_and_singular_in_tree() {
    let mut c = container(vec![mapping_re(".*", "")]);
    c.container_image = Some("r/top:$KERNEL_X".into());
    c.in_tree_module_to_remove = Some("joydev".into());
    let r = KernelMapper::new(&c)
        .unwrap()
        .resolve("6.1.0-1", "m", "ns")
        .unwrap()
        .unwrap();
    assert_eq!(r.container_image, "r/top:6");
    assert_eq!(r.in_tree_modules_to_remove, vec!["joydev".to_string()]);
    c.container_image = None;
    assert_eq!(
        KernelMapper::new(&c)
            .unwrap()
            .resolve("6.1.0-1", "m", "ns")
            .unwrap_err(),
        MappingError::NoImage { index: 0 }
    );
}

#[test]
fn build_args_always_carry_the_kernel_and_module() {
    let b = Build {
        build_args: vec![BuildArg {
            name: "KERNEL_VERSION".into(),
            value: "user".into(),
        }],
        ..Default::default()
    };
    let args = build_args_for(&b, &Variables::new("6.1.0-1+", "m", "spoke"));
    assert_eq!(args["KERNEL_VERSION"], "6.1.0-1");
    assert_eq!(args["MOD_NAMESPACE"], "spoke");
}
