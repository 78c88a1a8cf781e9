#![allow(clippy::unwrap_used)]

use super::*;
use clap::{CommandFactory, FromArgMatches, Parser};

/// Upstream's documented keys with upstream's defaults (hand-written, in its layout).
const UPSTREAM_DEFAULTS: &str = r#"
healthProbeBindAddress: :8081
webhookPort: 9443
leaderElection:
  enabled: true
  resourceID: kmm.sigs.x-k8s.io
metrics:
  bindAddress: 0.0.0.0:8443
  enableAuthnAuthz: true
  secureServing: true
worker:
  runAsUser: 0
  seLinuxType: spc_t
  firmwareHostPath: /var/lib/firmware
job:
  gcDelay: 0s
"#;

#[derive(Parser, Debug)]
struct Run {
    #[command(flatten)]
    common: crate::cli::CommonArgs,
}

fn run(args: &[&str]) -> (Run, clap::ArgMatches) {
    let m = Run::command()
        .try_get_matches_from(std::iter::once("run").chain(args.iter().copied()))
        .unwrap();
    (Run::from_arg_matches(&m).unwrap(), m)
}

#[test]
fn upstreams_own_keys_parse_without_unknowns() {
    let l = Loaded::parse("f", UPSTREAM_DEFAULTS).unwrap();
    assert!(l.unknown.is_empty(), "{:?}", l.unknown);
    let c = &l.config;
    assert_eq!(c.health_probe_bind_address.as_deref(), Some(":8081"));
    assert_eq!(c.webhook_port, Some(9443));
    let le = c.leader_election.as_ref().unwrap();
    assert_eq!(
        (le.enabled, le.resource_id.as_deref()),
        (Some(true), Some("kmm.sigs.x-k8s.io"))
    );
    let w = c.worker.as_ref().unwrap();
    assert_eq!(w.run_as_user, Some(0));
    assert_eq!(w.se_linux_type.as_deref(), Some("spc_t"));
    assert_eq!(w.firmware_host_path.as_deref(), Some("/var/lib/firmware"));
    assert_eq!(c.job.as_ref().unwrap().gc_delay.as_deref(), Some("0s"));
    // The midstream spellings and the pre-2024-08 firmware key are known too.
    let l = Loaded::parse(
        "f",
        "webhook: {port: 9443, certDir: /tmp/c, disableHTTP2: true}\n\
         metrics: {disableHTTP2: true}\nworker: {setFirmwareClassPath: /var/lib/firmware}\n",
    )
    .unwrap();
    assert!(l.unknown.is_empty(), "{:?}", l.unknown);
    assert!(Loaded::parse("f", "").unwrap().unknown.is_empty());
}

#[test]
fn a_whole_configmap_is_accepted() {
    let cm = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kmm-operator-manager-config}}\ndata:\n  {CONFIG_KEY}: |\n{}",
        UPSTREAM_DEFAULTS
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let l = Loaded::parse("cm", &cm).unwrap();
    assert_eq!(
        l.config,
        Loaded::parse("f", UPSTREAM_DEFAULTS).unwrap().config
    );
}

#[test]
fn unknown_keys_are_reported_not_fatal() {
    let l = Loaded::parse(
        "f",
        "healthProbeBindAddress: 127.0.0.1:9999\nfoo: 1\nmetrics: {bindAdress: x}\n",
    )
    .unwrap();
    assert_eq!(
        l.unknown,
        vec!["foo".to_string(), "metrics.bindAdress".into()]
    );
    assert_eq!(
        l.config.health_probe_bind_address.as_deref(),
        Some("127.0.0.1:9999")
    );
    let (mut r, m) = run(&[]);
    let mut o = Overlay::new(&l, Some(&m));
    apply_common(&l, &mut o, &mut r.common).unwrap();
    assert_eq!(o.not_applied(), vec!["foo", "metrics.bindAdress"]);
    assert_eq!(
        r.common.admin_address,
        Some("127.0.0.1:9999".parse().unwrap())
    );
    // A known key of the wrong type is an error, as a bad flag value would be.
    assert!(Loaded::parse("f", "webhookPort: many\n").is_err());
}

#[test]
fn flags_win_over_the_file_which_wins_over_defaults() {
    let l = Loaded::parse(
        "f",
        "healthProbeBindAddress: :7000\nleaderElection: {enabled: true, resourceID: from-file}\n\
         metrics: {bindAddress: '127.0.0.1:7001', secureServing: true}\n",
    )
    .unwrap();
    let (mut r, m) = run(&["--lease-name", "from-flag"]);
    let mut o = Overlay::new(&l, Some(&m));
    apply_common(&l, &mut o, &mut r.common).unwrap();
    assert_eq!(r.common.lease_name, "from-flag");
    assert_eq!(
        r.common.admin_address,
        Some("0.0.0.0:7000".parse().unwrap())
    );
    assert!(r.common.leader_elect);
    assert_eq!(
        r.common.metrics_address,
        Some("127.0.0.1:7001".parse().unwrap())
    );
    assert!(o.report.contains(&(
        "leaderElection.resourceID".into(),
        Outcome::Overridden("--lease-name".into())
    )));
    assert_eq!(o.not_applied(), vec!["metrics.secureServing"]);
    // Without the file the defaults stay.
    let (r, _) = run(&[]);
    assert_eq!(
        (r.common.lease_name.as_str(), r.common.leader_elect),
        ("kmm", false)
    );
}

#[test]
fn bind_addresses_and_durations_as_go_writes_them() {
    assert_eq!(bind_address("0").unwrap(), None);
    assert_eq!(
        bind_address(":8081").unwrap(),
        Some("0.0.0.0:8081".parse().unwrap())
    );
    assert_eq!(
        bind_address("127.0.0.1:8443").unwrap(),
        Some("127.0.0.1:8443".parse().unwrap())
    );
    assert!(bind_address(":http").is_err());
    assert_eq!(go_duration("0").unwrap(), Duration::ZERO);
    assert_eq!(go_duration("0s").unwrap(), Duration::ZERO);
    assert_eq!(go_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(go_duration("1.5h").unwrap(), Duration::from_secs(5400));
    assert_eq!(go_duration("250ms").unwrap(), Duration::from_millis(250));
    assert!(go_duration("10").is_err());
    assert!(go_duration("-1s").is_err());
    assert!(go_duration("5d").is_err());
}
