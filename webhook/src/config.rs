//! Cluster defaults from the `kinfer-config` ConfigMap in the install namespace.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `runtime-class-name` | `nvidia` | runtimeClassName of GPU pods; empty: leave it unset |
//! | `gpu-toleration-key` | `nvidia.com/gpu` | taint key of GPU nodes; empty: add no toleration |
//! | `gpu-toleration-operator` | `Exists` | `Exists` or `Equal` |
//! | `gpu-toleration-value` | (none) | needed with `Equal` |
//! | `gpu-toleration-effect` | `NoSchedule` | `NoSchedule`, `PreferNoSchedule`, `NoExecute` or empty (all) |
//! | `gpu-resource` | `nvidia.com/gpu` | resource of `gpu-sharing: exclusive` |
//! | `gpu-shared-resource` | `nvidia.com/gpu.shared` | resource of `gpu-sharing: time-sliced` |
//! | `gpu-memory-node-label` | `nvidia.com/gpu.memory` | node label with GPU memory in MiB (GFD) |
//! | `wrapper-image` | `ghcr.io/kinfer/kinfer-wrapper:latest` | image of the HTTP-wrapper init container |
//! | `wrapper-source` | `/kinfer-wrapper` | the wrapper inside that image; the init container runs `<it> install <wrapper-install-path>/bin` |
//! | `wrapper-install-path` | `/kinfer` | where the shared volume is mounted in the pod |
//!
//! Unknown keys are errors too (a typo in a ConfigMap should not silently fall back to a
//! default).

use std::collections::BTreeMap;

use crate::annotations::{check_extended_resource, nearest_in};

pub const CONFIG_MAP_NAME: &str = "kinfer-config";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinferConfig {
    pub runtime_class_name: Option<String>,
    pub gpu_toleration: Option<GpuToleration>,
    pub gpu_resource: String,
    pub gpu_shared_resource: String,
    pub gpu_memory_node_label: String,
    pub wrapper_image: String,
    pub wrapper_source: String,
    pub wrapper_install_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuToleration {
    pub key: String,
    pub operator: String,
    pub value: Option<String>,
    pub effect: Option<String>,
}

impl Default for KinferConfig {
    fn default() -> Self {
        Self {
            runtime_class_name: Some("nvidia".into()),
            gpu_toleration: Some(GpuToleration {
                key: "nvidia.com/gpu".into(),
                operator: "Exists".into(),
                value: None,
                effect: Some("NoSchedule".into()),
            }),
            gpu_resource: "nvidia.com/gpu".into(),
            gpu_shared_resource: "nvidia.com/gpu.shared".into(),
            gpu_memory_node_label: "nvidia.com/gpu.memory".into(),
            wrapper_image: "ghcr.io/kinfer/kinfer-wrapper:latest".into(),
            wrapper_source: "/kinfer-wrapper".into(),
            wrapper_install_path: "/kinfer".into(),
        }
    }
}

const KEYS: &[&str] = &[
    "runtime-class-name",
    "gpu-toleration-key",
    "gpu-toleration-operator",
    "gpu-toleration-value",
    "gpu-toleration-effect",
    "gpu-resource",
    "gpu-shared-resource",
    "gpu-memory-node-label",
    "wrapper-image",
    "wrapper-source",
    "wrapper-install-path",
];

/// A problem in `kinfer-config`, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ConfigMap {CONFIG_MAP_NAME}: key {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl KinferConfig {
    /// Reads the ConfigMap's `data`; missing keys take their defaults.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| {
            errors.push(ConfigError {
                key: key.to_string(),
                message,
            })
        };
        for key in data.keys() {
            if !KEYS.contains(&key.as_str()) {
                let hint = match nearest_in(key, KEYS) {
                    Some(k) => format!("did you mean {k}?"),
                    None => format!("known keys: {}", KEYS.join(", ")),
                };
                err(key, format!("unknown key ({hint})"));
            }
        }
        let get = |key: &str| data.get(key).map(|v| v.trim().to_string());
        let mut config = KinferConfig::default();

        if let Some(v) = get("runtime-class-name") {
            if v.is_empty() {
                config.runtime_class_name = None;
            } else if !is_dns_subdomain(&v) {
                err(
                    "runtime-class-name",
                    format!("{v:?} is not a valid RuntimeClass name (a lower-case DNS subdomain)"),
                );
            } else {
                config.runtime_class_name = Some(v);
            }
        }

        let key = get("gpu-toleration-key").unwrap_or_else(|| "nvidia.com/gpu".into());
        let operator = get("gpu-toleration-operator").unwrap_or_else(|| "Exists".into());
        let value = get("gpu-toleration-value").filter(|v| !v.is_empty());
        let effect = match get("gpu-toleration-effect") {
            None => Some("NoSchedule".to_string()),
            Some(e) if e.is_empty() => None,
            Some(e) => Some(e),
        };
        if !["Exists", "Equal"].contains(&operator.as_str()) {
            err(
                "gpu-toleration-operator",
                format!("{operator:?}: allowed: Exists, Equal"),
            );
        }
        if operator == "Exists" && value.is_some() {
            err(
                "gpu-toleration-value",
                "must be empty when gpu-toleration-operator is Exists".into(),
            );
        }
        if operator == "Equal" && value.is_none() {
            err(
                "gpu-toleration-value",
                "needed when gpu-toleration-operator is Equal".into(),
            );
        }
        if let Some(e) = &effect
            && !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&e.as_str())
        {
            err(
                "gpu-toleration-effect",
                format!(
                    "{e:?}: allowed: NoSchedule, PreferNoSchedule, NoExecute, or empty for all"
                ),
            );
        }
        config.gpu_toleration = (!key.is_empty()).then_some(GpuToleration {
            key,
            operator,
            value,
            effect,
        });

        for (name, slot) in [
            ("gpu-resource", &mut config.gpu_resource),
            ("gpu-shared-resource", &mut config.gpu_shared_resource),
        ] {
            if let Some(v) = get(name) {
                match check_extended_resource(&v) {
                    Ok(()) => *slot = v,
                    Err(why) => err(
                        name,
                        format!("{v:?} is not an extended resource name: {why}"),
                    ),
                }
            }
        }
        if let Some(v) = get("gpu-memory-node-label") {
            if v.is_empty() {
                err("gpu-memory-node-label", "must not be empty".into());
            } else {
                config.gpu_memory_node_label = v;
            }
        }
        if let Some(v) = get("wrapper-image") {
            if v.is_empty() || v.contains(char::is_whitespace) {
                err("wrapper-image", format!("{v:?} is not an image reference"));
            } else {
                config.wrapper_image = v;
            }
        }
        for (name, slot) in [
            ("wrapper-source", &mut config.wrapper_source),
            ("wrapper-install-path", &mut config.wrapper_install_path),
        ] {
            if let Some(v) = get(name) {
                if !v.starts_with('/') || v == "/" || v.contains(char::is_whitespace) {
                    err(name, format!("{v:?} must be an absolute path other than /"));
                } else {
                    *slot = v.trim_end_matches('/').to_string();
                }
            }
        }

        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_config_map_gives_the_documented_defaults() {
        let c = KinferConfig::from_data(&BTreeMap::new()).unwrap();
        assert_eq!(c, KinferConfig::default());
        assert_eq!(c.runtime_class_name.as_deref(), Some("nvidia"));
        let t = c.gpu_toleration.unwrap();
        assert_eq!(
            (t.key.as_str(), t.operator.as_str(), t.effect.as_deref()),
            ("nvidia.com/gpu", "Exists", Some("NoSchedule"))
        );
        assert_eq!(c.gpu_resource, "nvidia.com/gpu");
        assert_eq!(c.gpu_shared_resource, "nvidia.com/gpu.shared");
        assert_eq!(c.gpu_memory_node_label, "nvidia.com/gpu.memory");
    }

    #[test]
    fn overrides_and_switches() {
        let c = KinferConfig::from_data(&data(&[
            ("runtime-class-name", ""),
            ("gpu-toleration-key", "gpu"),
            ("gpu-toleration-operator", "Equal"),
            ("gpu-toleration-value", "present"),
            ("gpu-toleration-effect", ""),
            ("gpu-resource", "amd.com/gpu"),
            ("wrapper-image", "registry.local/wrapper:1"),
            ("wrapper-install-path", "/opt/kinfer/"),
        ]))
        .unwrap();
        assert_eq!(c.runtime_class_name, None);
        assert_eq!(
            c.gpu_toleration,
            Some(GpuToleration {
                key: "gpu".into(),
                operator: "Equal".into(),
                value: Some("present".into()),
                effect: None
            })
        );
        assert_eq!(c.gpu_resource, "amd.com/gpu");
        assert_eq!(c.wrapper_image, "registry.local/wrapper:1");
        assert_eq!(c.wrapper_install_path, "/opt/kinfer");

        let c = KinferConfig::from_data(&data(&[("gpu-toleration-key", "")])).unwrap();
        assert_eq!(c.gpu_toleration, None);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("runtime-class", "nvidia")],
                "ConfigMap kinfer-config: key runtime-class: unknown key (did you mean runtime-class-name?)",
            ),
            (
                &[("gpu-toleration-operator", "In")],
                "key gpu-toleration-operator: \"In\": allowed: Exists, Equal",
            ),
            (
                &[("gpu-toleration-operator", "Equal")],
                "key gpu-toleration-value: needed when gpu-toleration-operator is Equal",
            ),
            (
                &[("gpu-toleration-effect", "Never")],
                "key gpu-toleration-effect: \"Never\"",
            ),
            (
                &[("gpu-resource", "gpu")],
                "key gpu-resource: \"gpu\" is not an extended resource name",
            ),
            (
                &[("runtime-class-name", "Nvidia")],
                "key runtime-class-name: \"Nvidia\" is not a valid RuntimeClass name",
            ),
            (
                &[("wrapper-install-path", "kinfer")],
                "key wrapper-install-path: \"kinfer\" must be an absolute path",
            ),
            (&[("wrapper-image", "a b")], "key wrapper-image"),
        ];
        for (pairs, want) in cases {
            let errs = KinferConfig::from_data(&data(pairs)).unwrap_err();
            let got = errs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            assert!(got.contains(want), "{pairs:?}\n got: {got}\nwant: {want}");
        }
    }
}
