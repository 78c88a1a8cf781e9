//! `kmm-hub machineconfig`: the MachineConfig (and, with `--with-pool`, the MachineConfigPool)
//! for Day-1 loading of a kernel module, or for the firmware search path, as YAML to apply to
//! an OpenShift cluster. No cluster needed.

use std::io::Write;

use anyhow::Context as _;

use crate::render::machineconfig::{
    Day1, Day1Images, FirmwarePath, day1_machine_config, firmware_machine_config,
    machine_config_pool, to_yaml,
};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["image", "firmware_path"])))]
pub struct MachineConfigArgs {
    /// The MachineConfig's name.
    #[arg(long, env = "KMM_MACHINECONFIG_NAME")]
    pub name: String,
    /// The MachineConfigPool whose nodes get it (`machineconfiguration.openshift.io/role`).
    #[arg(long, env = "KMM_MACHINECONFIG_POOL")]
    pub pool: String,
    /// Day 1: the kmod image, with the module under /opt/lib/modules/<kernel>/.
    #[arg(long, env = "KMM_MACHINECONFIG_IMAGE", requires = "module")]
    pub image: Option<String>,
    /// Day 1: the out-of-tree module to load.
    #[arg(long, env = "KMM_MACHINECONFIG_MODULE", requires = "image")]
    pub module: Option<String>,
    /// Day 1: the in-tree module to unload first (default: the one named like --module).
    #[arg(long, env = "KMM_MACHINECONFIG_IN_TREE_MODULE", requires = "module")]
    pub in_tree_module: Option<String>,
    /// Instead of Day 1: add this directory to the kernel's firmware search path
    /// (`firmware_class.path=` kernel argument), e.g. /var/lib/firmware.
    #[arg(long, env = "KMM_MACHINECONFIG_FIRMWARE_PATH", conflicts_with_all = ["image", "module", "in_tree_module"])]
    pub firmware_path: Option<String>,
    /// Also print the MachineConfigPool (machine configs of `worker` and the pool, nodes
    /// labelled node-role.kubernetes.io/<pool>).
    #[arg(long, env = "KMM_MACHINECONFIG_WITH_POOL")]
    pub with_pool: bool,
}

/// The objects the arguments ask for, in apply order (the pool first).
pub fn objects(args: &MachineConfigArgs) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    if args.with_pool {
        out.push(machine_config_pool(&args.pool)?);
    }
    let mc = match (&args.firmware_path, &args.image, &args.module) {
        (Some(path), _, _) => firmware_machine_config(&FirmwarePath {
            name: args.name.clone(),
            pool: args.pool.clone(),
            path: path.clone(),
        })?,
        (None, Some(image), Some(module)) => day1_machine_config(&Day1 {
            name: args.name.clone(),
            pool: args.pool.clone(),
            images: Day1Images::One(image.clone()),
            module: module.clone(),
            in_tree_module: args.in_tree_module.clone(),
        })?,
        _ => anyhow::bail!("give --image and --module (Day 1), or --firmware-path"),
    };
    out.push(mc);
    Ok(out)
}

/// Print the objects as YAML on `out`.
pub fn run(args: &MachineConfigArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let text = to_yaml(&objects(args)?).context("writing YAML")?;
    out.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<super::MachineConfigArgs, clap::Error> {
        let mut all = vec!["kmm-hub", "machineconfig"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all)?.command {
            Command::Machineconfig(a) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn day1_with_pool_prints_the_pool_then_the_machine_config() {
        let args = parse(&[
            "--name",
            "99-sfc",
            "--pool",
            "sfc",
            "--image",
            "quay.io/x/sfc:1",
            "--module",
            "sfc",
            "--in-tree-module",
            "sfc_old",
            "--with-pool",
        ])
        .unwrap();
        let mut out = Vec::new();
        super::run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let pool = text.find("kind: MachineConfigPool").unwrap();
        let mc = text.find("kind: MachineConfig\n").unwrap();
        assert!(pool < mc, "{text}");
        assert!(text.contains("kmm-day1-load-sfc.service"), "{text}");
        assert!(text.contains("quay.io/x/sfc:1 sfc sfc_old"), "{text}");
    }

    #[test]
    fn firmware_prints_one_machine_config_with_the_kernel_argument() {
        let args = parse(&[
            "--name",
            "99-fw",
            "--pool",
            "worker",
            "--firmware-path",
            "/var/lib/firmware",
        ])
        .unwrap();
        let objects = super::objects(&args).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(
            objects[0]["spec"]["kernelArguments"][0],
            "firmware_class.path=/var/lib/firmware"
        );
    }

    #[test]
    fn the_flags_say_which_combinations_make_sense() {
        // Neither Day 1 nor firmware.
        assert!(parse(&["--name", "a", "--pool", "p"]).is_err());
        // An image without a module, an in-tree module without the rest.
        assert!(parse(&["--name", "a", "--pool", "p", "--image", "i"]).is_err());
        assert!(
            parse(&[
                "--name",
                "a",
                "--pool",
                "p",
                "--firmware-path",
                "/f",
                "--in-tree-module",
                "m"
            ])
            .is_err()
        );
        // Day 1 and firmware together.
        assert!(
            parse(&[
                "--name",
                "a",
                "--pool",
                "p",
                "--image",
                "i",
                "--module",
                "m",
                "--firmware-path",
                "/f",
            ])
            .is_err()
        );
        // --with-pool for a built-in pool is refused when rendering.
        let args = parse(&[
            "--name",
            "a",
            "--pool",
            "worker",
            "--firmware-path",
            "/f",
            "--with-pool",
        ])
        .unwrap();
        assert!(super::objects(&args).is_err());
    }
}
