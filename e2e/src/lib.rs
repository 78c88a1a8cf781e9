//! The kmm-fleet test world: real kube-apiserver/kube-controller-manager/kube-scheduler/etcd
//! per cluster on loopback, the real OCM programs, a real OCI registry, real Linux kernels in
//! qemu VMs under the nodes that load modules ([`vm`]), and simulators for what needs a
//! machine we lack (kubelets and container runtimes, el9 kernels, the kaniko executor).

pub mod cluster;
pub mod fleet;
pub mod kbuild;
pub mod kmod;
pub mod labs;
pub mod manifests;
pub mod oci;
pub mod ocm;
pub mod openshift;
pub mod pki;
pub mod process;
pub mod provision;
pub mod registry;
pub mod sandbox;
pub mod sim;
pub mod testkit;
pub mod userspace;
pub mod vm;
