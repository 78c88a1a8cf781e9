//! The kmm-fleet test world: real kube-apiserver/kube-controller-manager/etcd per
//! cluster on loopback, a real OCI registry, and simulators for what needs a machine
//! (nodes and kubelets, the OCM registration and work agents, the kaniko executor).

pub mod cluster;
pub mod fleet;
pub mod kbuild;
pub mod kmod;
pub mod labs;
pub mod oci;
pub mod ocm;
pub mod pki;
pub mod process;
pub mod provision;
pub mod registry;
pub mod sandbox;
pub mod sim;
pub mod testkit;
pub mod userspace;
pub mod vm;
