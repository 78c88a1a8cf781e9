//! Day 1 on a real kernel: the MachineConfig `kmm-hub machineconfig` prints is installed into
//! a node's host OS as Ignition would ([`HostRoot`]), and its own units' command lines run
//! there in the order of a first boot (the seed's story): the load service before the network
//! finds no image and leaves the in-tree module alone; the pull service after NetworkManager
//! pulls the image and asks for one reboot; the load service of the next boot replaces the
//! in-tree module with the out-of-tree one in the VM's kernel. (The VM is not rebooted: the
//! state the next boot starts from — in-tree module loaded, image in the node's store — is
//! the state it is in.)

use kmm_e2e::oci::Layer;
use kmm_e2e::sim::host::HostRoot;
use kmm_hub::render::machineconfig::{Day1, Day1Images, LOAD_SCRIPT_PATH, day1_machine_config};

use super::*;

/// A kmod image for `kernel` holding `kmm_ci_a` (version `version`) under
/// `/opt/lib/modules/<kernel>/` with depmod's indexes, on the base userspace.
fn kmod_image(kernel: &str, ko: &[u8]) -> anyhow::Result<Vec<Layer>> {
    let mut files = BTreeMap::new();
    files.insert(
        format!("/opt/lib/modules/{kernel}/kmm_ci_a.ko"),
        ko.to_vec(),
    );
    if kernel == real_kernel() {
        files.extend(kmm_e2e::kbuild::depmod(&files, "/opt", kernel)?);
    }
    Ok(vec![
        Layer {
            data: kmm_e2e::userspace::layer()?.to_vec(),
            gzipped: false,
        },
        Layer {
            data: kmm_e2e::oci::tar_files(&files)?,
            gzipped: false,
        },
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn day1_services_replace_the_in_tree_module_on_a_real_kernel() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    init_tracing();
    let bins = tokio::task::spawn_blocking(kmm_e2e::provision::ensure_provisioned).await??;
    let kernel = bins.kernel.release.clone();
    let tmp = tempfile::tempdir()?;
    let spec = VmSpec {
        name: "day1".into(),
        secure_boot: None,
    };
    let vm = Vm::boot(&bins, &spec, &tmp.path().join("vm")).await?;
    let out = vm.exec("modprobe joydev").await?;
    ensure!(out.status == 0, "modprobe joydev: {}", out.output);
    ensure!(
        vm.modules().await? == vec!["joydev".to_string()],
        "joydev in-tree"
    );

    let ko = kmm_e2e::kbuild::compile(&kernel, &["kmm_ci_a"], "1.0")?
        .remove("kmm_ci_a")
        .context("compiled")?;
    let image = "127.0.0.1:5000/kmm/kmm-ci-a:day1";
    let other = "127.0.0.1:5000/kmm/kmm-ci-a:other-kernel";
    let layers = kmod_image(&kernel, &ko)?;
    // As the hub ships it: an image per kernel, the node takes its own kernel's.
    let mc = day1_machine_config(&Day1 {
        name: "99-worker-kmm-ci-a".into(),
        pool: "worker".into(),
        images: Day1Images::PerKernel(BTreeMap::from([
            (kernel.clone(), image.to_string()),
            ("6.0.0-0-other".to_string(), other.to_string()),
        ])),
        module: "kmm_ci_a".into(),
        in_tree_module: Some("joydev".into()),
    })?;
    let root = HostRoot::create(&vm, "host")?;
    let units = root.install_machine_config(&mc)?;
    let (load, pull) = (
        "kmm-day1-load-kmm_ci_a.service",
        "kmm-day1-pull-kmm_ci_a.service",
    );
    assert_eq!(units, vec![load.to_string(), pull.to_string()]);

    // An image built for another kernel: the load step stops before touching the in-tree
    // module, and says why.
    root.put_image(other, &kmod_image("6.0.0-0-other", &ko)?)?;
    let out = root
        .run(&vm, &format!("{LOAD_SCRIPT_PATH} {other} kmm_ci_a joydev"))
        .await?;
    eprintln!("wrong kernel: exit {}\n{}", out.status, out.output);
    ensure!(
        out.status != 0,
        "an image without the node's kernel must fail the unit"
    );
    ensure!(
        out.output.contains("was not built for this node's kernel"),
        "{}",
        out.output
    );
    ensure!(
        vm.modules().await? == vec!["joydev".to_string()],
        "nothing changed"
    );

    // First boot, before the network: no image, none pullable — nothing changes, exit 0.
    let out = root.start_unit(&vm, load).await?;
    eprintln!(
        "load before the network: exit {}\n{}",
        out.status, out.output
    );
    ensure!(out.status == 0, "{}", out.output);
    ensure!(
        out.output
            .contains("kmm-day1-pull-kmm_ci_a.service will pull it")
    );
    ensure!(
        vm.modules().await? == vec!["joydev".to_string()],
        "nothing changed"
    );

    // After NetworkManager: the pull service pulls the image and asks for one reboot.
    root.make_reachable(image, &layers)?;
    let out = root.start_unit(&vm, pull).await?;
    eprintln!("pull: exit {}\n{}", out.status, out.output);
    ensure!(out.status == 0, "{}", out.output);
    ensure!(root.has_image(image), "pulled into the node's store");
    assert_eq!(root.systemd_requests(), vec!["reboot".to_string()]);

    // The next boot: the load service replaces joydev with kmm_ci_a in the kernel.
    let out = root.start_unit(&vm, load).await?;
    eprintln!("load on the next boot: exit {}\n{}", out.status, out.output);
    ensure!(out.status == 0, "{}", out.output);
    ensure!(
        out.output.contains("unloading in-tree module joydev"),
        "{}",
        out.output
    );
    let m = vm.modules().await?;
    ensure!(
        m == vec!["kmm_ci_a".to_string()],
        "joydev out, kmm_ci_a in: {m:?}"
    );
    let version = vm.exec("cat /sys/module/kmm_ci_a/version").await?;
    ensure!(version.output.trim() == "1.0", "{}", version.output);
    let log = dmesg(&vm, "kmm_ci_a").await?;
    ensure!(log.iter().any(|l| l.contains("Hello")), "{log:?}");

    // The pull service of that boot finds the image: no second reboot.
    let out = root.start_unit(&vm, pull).await?;
    ensure!(out.status == 0, "{}", out.output);
    ensure!(out.output.contains("is on the node"), "{}", out.output);
    assert_eq!(root.systemd_requests(), vec!["reboot".to_string()]);
    vm.shutdown().await;
    Ok(())
}
