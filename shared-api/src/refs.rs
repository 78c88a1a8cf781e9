//! Every Secret and ConfigMap a ManagedClusterModule names, with its field path.
//!
//! The hub reads the `Hub` ones in its own namespace (registry credentials, signing key and
//! certificate, build secrets, the Dockerfile); the admission webhook checks that whoever
//! writes an MCM may `get` each of them there. The `Spoke` ones (device-plugin and DRA
//! volumes and environment) are resolved on every spoke in `spokeNamespace` by the pods the
//! Module starts; the hub never reads them.

use k8s_openapi::api::core::v1::{EnvVar, Volume};

use crate::mcm::ManagedClusterModuleSpec;
use crate::module::{Build, DevicePluginContainerSpec, Sign};

/// What kind of object is referenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefKind {
    Secret,
    ConfigMap,
}

impl RefKind {
    /// The resource name, as RBAC and SubjectAccessReviews spell it.
    pub fn resource(self) -> &'static str {
        match self {
            RefKind::Secret => "secrets",
            RefKind::ConfigMap => "configmaps",
        }
    }
}

/// Where the referenced object is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefScope {
    /// By the hub, in its own namespace.
    Hub,
    /// By pods on each spoke, in `spokeNamespace`.
    Spoke,
}

/// One reference: `path` is the field holding `name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub path: String,
    pub kind: RefKind,
    pub name: String,
    pub scope: RefScope,
}

#[derive(Default)]
struct Refs(Vec<ObjectRef>);

impl Refs {
    fn push(&mut self, path: String, kind: RefKind, name: &str, scope: RefScope) {
        self.0.push(ObjectRef {
            path,
            kind,
            name: name.to_string(),
            scope,
        });
    }

    fn build(&mut self, at: &str, b: &Build) {
        if let Some(cm) = &b.dockerfile_config_map {
            self.push(
                format!("{at}.dockerfileConfigMap.name"),
                RefKind::ConfigMap,
                &cm.name,
                RefScope::Hub,
            );
        }
        for (i, s) in b.secrets.iter().enumerate() {
            self.push(
                format!("{at}.secrets[{i}].name"),
                RefKind::Secret,
                &s.name,
                RefScope::Hub,
            );
        }
    }

    fn sign(&mut self, at: &str, s: &Sign) {
        if let Some(k) = &s.key_secret {
            self.push(
                format!("{at}.keySecret.name"),
                RefKind::Secret,
                &k.name,
                RefScope::Hub,
            );
        }
        if let Some(c) = &s.cert_secret {
            self.push(
                format!("{at}.certSecret.name"),
                RefKind::Secret,
                &c.name,
                RefScope::Hub,
            );
        }
    }

    fn volumes(&mut self, at: &str, volumes: &[Volume]) {
        for (i, v) in volumes.iter().enumerate() {
            let at = format!("{at}.volumes[{i}]");
            if let Some(name) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
                self.push(
                    format!("{at}.secret.secretName"),
                    RefKind::Secret,
                    name,
                    RefScope::Spoke,
                );
            }
            if let Some(cm) = &v.config_map {
                self.push(
                    format!("{at}.configMap.name"),
                    RefKind::ConfigMap,
                    &cm.name,
                    RefScope::Spoke,
                );
            }
            let sources = v.projected.iter().flat_map(|p| p.sources.iter().flatten());
            for (j, src) in sources.enumerate() {
                if let Some(s) = &src.secret {
                    self.push(
                        format!("{at}.projected.sources[{j}].secret.name"),
                        RefKind::Secret,
                        &s.name,
                        RefScope::Spoke,
                    );
                }
                if let Some(c) = &src.config_map {
                    self.push(
                        format!("{at}.projected.sources[{j}].configMap.name"),
                        RefKind::ConfigMap,
                        &c.name,
                        RefScope::Spoke,
                    );
                }
            }
        }
    }

    fn env(&mut self, at: &str, env: &[EnvVar]) {
        for (i, e) in env.iter().enumerate() {
            let Some(from) = &e.value_from else { continue };
            if let Some(s) = &from.secret_key_ref {
                self.push(
                    format!("{at}.env[{i}].valueFrom.secretKeyRef.name"),
                    RefKind::Secret,
                    &s.name,
                    RefScope::Spoke,
                );
            }
            if let Some(c) = &from.config_map_key_ref {
                self.push(
                    format!("{at}.env[{i}].valueFrom.configMapKeyRef.name"),
                    RefKind::ConfigMap,
                    &c.name,
                    RefScope::Spoke,
                );
            }
        }
    }

    fn container(&mut self, at: &str, c: &DevicePluginContainerSpec) {
        self.env(at, &c.env);
    }
}

/// Every Secret and ConfigMap the MCM names, in field order, with the path of the field
/// (`spec.moduleSpec.…`). Empty names are listed too: validation rejects them separately.
pub fn object_refs(spec: &ManagedClusterModuleSpec) -> Vec<ObjectRef> {
    let m = &spec.module_spec;
    let mut r = Refs::default();
    if let Some(s) = &m.image_repo_secret {
        r.push(
            "spec.moduleSpec.imageRepoSecret.name".into(),
            RefKind::Secret,
            &s.name,
            RefScope::Hub,
        );
    }
    if let Some(l) = &m.module_loader {
        let at = "spec.moduleSpec.moduleLoader.container";
        if let Some(b) = &l.container.build {
            r.build(&format!("{at}.build"), b);
        }
        if let Some(s) = &l.container.sign {
            r.sign(&format!("{at}.sign"), s);
        }
        for (i, k) in l.container.kernel_mappings.iter().enumerate() {
            let at = format!("{at}.kernelMappings[{i}]");
            if let Some(b) = &k.build {
                r.build(&format!("{at}.build"), b);
            }
            if let Some(s) = &k.sign {
                r.sign(&format!("{at}.sign"), s);
            }
        }
    }
    if let Some(d) = &m.device_plugin {
        let at = "spec.moduleSpec.devicePlugin";
        r.volumes(at, &d.volumes);
        r.container(&format!("{at}.container"), &d.container);
        if let Some(i) = &d.init_container {
            r.container(&format!("{at}.initContainer"), i);
        }
    }
    if let Some(d) = &m.dra {
        let at = "spec.moduleSpec.dra";
        r.volumes(at, &d.volumes);
        r.container(&format!("{at}.container"), &d.container);
        if let Some(i) = &d.init_container {
            r.container(&format!("{at}.initContainer"), i);
        }
    }
    // spec.day0: the layered image's Dockerfile, build secrets and signing key, on the hub.
    if let Some(d) = &spec.day0 {
        r.build("spec.day0.build", &d.build);
        if let Some(s) = &d.sign {
            r.sign("spec.day0.sign", s);
        }
    }
    r.0
}

/// The references the hub reads in its own namespace.
pub fn hub_refs(spec: &ManagedClusterModuleSpec) -> Vec<ObjectRef> {
    object_refs(spec)
        .into_iter()
        .filter(|r| r.scope == RefScope::Hub)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_with_its_path() {
        let spec: ManagedClusterModuleSpec = serde_json::from_value(serde_json::json!({
            "spokeNamespace": "ns", "selector": {},
            "moduleSpec": {
                "selector": {},
                "imageRepoSecret": {"name": "pull"},
                "moduleLoader": {"container": {
                    "modprobe": {"moduleName": "m", "firmwarePath": "/firmware"},
                    "build": {"dockerfileConfigMap": {"name": "df"}, "secrets": [{"name": "git"}],
                        "buildArgs": [{"name": "A", "value": "b"}]},
                    "sign": {"keySecret": {"name": "sb-key"}, "certSecret": {"name": "sb-cert"}},
                    "kernelMappings": [
                        {"regexp": ".*", "containerImage": "r/x:1"},
                        {"literal": "6.1", "containerImage": "r/y:1",
                         "build": {"dockerfileConfigMap": {"name": "df2"}, "secrets": [{"name": "a"}, {"name": "b"}]},
                         "sign": {"keySecret": {"name": "k2"}, "certSecret": {"name": "c2"}}}
                    ]
                }},
                "devicePlugin": {
                    "container": {"image": "dp", "env": [
                        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "dp-secret", "key": "k"}}},
                        {"name": "Y", "value": "plain"}]},
                    "initContainer": {"image": "init", "env": [
                        {"name": "Z", "valueFrom": {"configMapKeyRef": {"name": "dp-cm", "key": "k"}}}]},
                    "volumes": [
                        {"name": "a", "secret": {"secretName": "vol-secret"}},
                        {"name": "b", "configMap": {"name": "vol-cm"}},
                        {"name": "c", "projected": {"sources": [{"secret": {"name": "p-s"}}, {"configMap": {"name": "p-c"}}]}},
                        {"name": "d", "hostPath": {"path": "/x"}}]
                }
            }
        }))
        .unwrap();
        let got: Vec<(String, RefKind, String, RefScope)> = object_refs(&spec)
            .into_iter()
            .map(|r| (r.path, r.kind, r.name, r.scope))
            .collect();
        use RefKind::*;
        use RefScope::*;
        let l = "spec.moduleSpec.moduleLoader.container";
        let dp = "spec.moduleSpec.devicePlugin";
        let want = vec![
            (
                "spec.moduleSpec.imageRepoSecret.name".to_string(),
                Secret,
                "pull",
                Hub,
            ),
            (
                format!("{l}.build.dockerfileConfigMap.name"),
                ConfigMap,
                "df",
                Hub,
            ),
            (format!("{l}.build.secrets[0].name"), Secret, "git", Hub),
            (format!("{l}.sign.keySecret.name"), Secret, "sb-key", Hub),
            (format!("{l}.sign.certSecret.name"), Secret, "sb-cert", Hub),
            (
                format!("{l}.kernelMappings[1].build.dockerfileConfigMap.name"),
                ConfigMap,
                "df2",
                Hub,
            ),
            (
                format!("{l}.kernelMappings[1].build.secrets[0].name"),
                Secret,
                "a",
                Hub,
            ),
            (
                format!("{l}.kernelMappings[1].build.secrets[1].name"),
                Secret,
                "b",
                Hub,
            ),
            (
                format!("{l}.kernelMappings[1].sign.keySecret.name"),
                Secret,
                "k2",
                Hub,
            ),
            (
                format!("{l}.kernelMappings[1].sign.certSecret.name"),
                Secret,
                "c2",
                Hub,
            ),
            (
                format!("{dp}.volumes[0].secret.secretName"),
                Secret,
                "vol-secret",
                Spoke,
            ),
            (
                format!("{dp}.volumes[1].configMap.name"),
                ConfigMap,
                "vol-cm",
                Spoke,
            ),
            (
                format!("{dp}.volumes[2].projected.sources[0].secret.name"),
                Secret,
                "p-s",
                Spoke,
            ),
            (
                format!("{dp}.volumes[2].projected.sources[1].configMap.name"),
                ConfigMap,
                "p-c",
                Spoke,
            ),
            (
                format!("{dp}.container.env[0].valueFrom.secretKeyRef.name"),
                Secret,
                "dp-secret",
                Spoke,
            ),
            (
                format!("{dp}.initContainer.env[0].valueFrom.configMapKeyRef.name"),
                ConfigMap,
                "dp-cm",
                Spoke,
            ),
        ];
        let want: Vec<_> = want
            .into_iter()
            .map(|(p, k, n, s)| (p, k, n.to_string(), s))
            .collect();
        assert_eq!(got, want);
        assert_eq!(hub_refs(&spec).len(), 10);
    }

    /// `spec.day0` names a Dockerfile, build secrets and signing secrets the hub reads.
    #[test]
    fn day0_references_are_the_hubs() {
        let spec: ManagedClusterModuleSpec = serde_json::from_value(serde_json::json!({
            "spokeNamespace": "ns", "selector": {},
            "moduleSpec": {"selector": {}, "devicePlugin": {"container": {"image": "r/dp:1"}}},
            "day0": {"machineConfigPool": "worker", "containerImage": "r/os",
                "build": {"dockerfileConfigMap": {"name": "layering"}, "secrets": [{"name": "git"}]},
                "sign": {"keySecret": {"name": "k"}, "certSecret": {"name": "c"}, "filesToSign": ["/m.ko"]}}
        }))
        .unwrap();
        let got: Vec<(String, RefKind, String)> = hub_refs(&spec)
            .into_iter()
            .map(|r| (r.path, r.kind, r.name))
            .collect();
        let want = |p: &str, k, n: &str| (p.to_string(), k, n.to_string());
        assert_eq!(
            got,
            vec![
                want(
                    "spec.day0.build.dockerfileConfigMap.name",
                    RefKind::ConfigMap,
                    "layering"
                ),
                want("spec.day0.build.secrets[0].name", RefKind::Secret, "git"),
                want("spec.day0.sign.keySecret.name", RefKind::Secret, "k"),
                want("spec.day0.sign.certSecret.name", RefKind::Secret, "c"),
            ]
        );
    }

    #[test]
    fn nothing_referenced() {
        let spec: ManagedClusterModuleSpec = serde_json::from_value(serde_json::json!({
            "spokeNamespace": "ns", "selector": {},
            "moduleSpec": {"selector": {}, "moduleLoader": {"container": {
                "modprobe": {"moduleName": "m"}, "kernelMappings": [{"regexp": ".*", "containerImage": "r/x:1"}]}}}
        }))
        .unwrap();
        assert!(object_refs(&spec).is_empty());
    }
}
