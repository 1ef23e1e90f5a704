//! The `kinfer.dev/*` annotations of a revision template, parsed into a typed [`KinferSpec`].
//!
//! Pure: no I/O. Every problem is reported at once (a user fixing a Service should not have to
//! resubmit it once per mistake), and every message names the annotation, the value and what
//! is allowed.

use std::collections::BTreeMap;
use std::fmt;

use kinfer_core::warmpool::POD_BOOKKEEPING_ANNOTATIONS;

/// Prefix of every kinfer annotation.
pub const PREFIX: &str = "kinfer.dev/";

pub const ACCELERATOR: &str = "kinfer.dev/accelerator";
pub const GPU_COUNT: &str = "kinfer.dev/gpu-count";
pub const GPU_SHARING: &str = "kinfer.dev/gpu-sharing";
pub const GPU_RESOURCE: &str = "kinfer.dev/gpu-resource";
pub const MODEL_MEMORY: &str = "kinfer.dev/model-memory";
pub const HANDLER: &str = "kinfer.dev/handler";
/// Opts a revision into the autoscaler plugin (autoscaler-plugin/README.md); validated here,
/// used there.
pub const AUTOSCALING: &str = "kinfer.dev/autoscaling";
pub const AUTOSCALING_GPU_TARGET: &str = "kinfer.dev/autoscaling-gpu-target";
const AUTOSCALING_MODES: &[&str] = &["requests", "gpu", "combined", "off"];

/// Every annotation kinfer understands, in the order the docs list them. A later feature (e.g.
/// the autoscaler's signal annotation) adds its key here and to [`KinferSpec`].
pub const KNOWN_KEYS: &[&str] = &[
    ACCELERATOR,
    GPU_COUNT,
    GPU_SHARING,
    GPU_RESOURCE,
    MODEL_MEMORY,
    HANDLER,
    AUTOSCALING,
    AUTOSCALING_GPU_TARGET,
];

/// Upper bound for `gpu-count`: far above any node, low enough to catch typos like `10000`.
pub const MAX_GPU_COUNT: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accelerator {
    #[default]
    Cpu,
    Gpu,
    /// A GPU and a CPU variant with load balanced between them. Until the two-level
    /// scheduling work lands, `auto` is placed exactly like `gpu` (with a warning).
    Auto,
}

impl Accelerator {
    const ALLOWED: &'static [&'static str] = &["cpu", "gpu", "auto"];

    /// Whether the pod gets a GPU.
    pub fn wants_gpu(self) -> bool {
        matches!(self, Accelerator::Gpu | Accelerator::Auto)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuSharing {
    #[default]
    Exclusive,
    TimeSliced,
}

impl GpuSharing {
    const ALLOWED: &'static [&'static str] = &["exclusive", "time-sliced"];
}

/// A Python handler, `module:function` (module may be dotted: `pkg.model:predict`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub module: String,
    pub function: String,
}

impl fmt::Display for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.module, self.function)
    }
}

/// What the kinfer annotations of one revision ask for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KinferSpec {
    pub accelerator: Accelerator,
    /// Whole GPUs per pod (default 1).
    pub gpu_count: u32,
    pub gpu_sharing: GpuSharing,
    /// Overrides the GPU resource name from `kinfer-config`.
    pub gpu_resource: Option<String>,
    /// Minimum GPU memory per GPU, in MiB (rounded up).
    pub model_memory_mib: Option<u64>,
    pub handler: Option<Handler>,
}

impl KinferSpec {
    /// Whether any kinfer annotation asks for a change to the pod.
    pub fn is_noop(&self) -> bool {
        !self.accelerator.wants_gpu() && self.handler.is_none()
    }
}

/// The spec plus things the user should know but that are not errors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub spec: KinferSpec,
    pub warnings: Vec<String>,
}

/// One problem with the annotations. `Display` is the message the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("unknown annotation {key}{}", suggestion_text(.suggestion.as_deref()))]
    UnknownKey {
        key: String,
        suggestion: Option<&'static str>,
    },
    #[error("annotation {key}: invalid value {value:?}: {allowed}{}", hint_text(.hint.as_deref()))]
    InvalidValue {
        key: &'static str,
        value: String,
        allowed: String,
        hint: Option<String>,
    },
    #[error(
        "annotation {key}: {value:?} needs a GPU, but kinfer.dev/accelerator is {accelerator}; set kinfer.dev/accelerator: gpu (or auto), or remove {key}"
    )]
    NeedsGpu {
        key: &'static str,
        value: String,
        /// `"cpu"` or `"cpu (the default)"`.
        accelerator: &'static str,
    },
}

fn suggestion_text(s: Option<&str>) -> String {
    match s {
        Some(s) => format!(" (did you mean {s}?)"),
        None => format!("; known kinfer annotations: {}", KNOWN_KEYS.join(", ")),
    }
}

fn hint_text(s: Option<&str>) -> String {
    s.map(|s| format!(" ({s})")).unwrap_or_default()
}

/// All problems found, in annotation-key order. `Display` joins the messages with `; `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationErrors(pub Vec<AnnotationError>);

impl fmt::Display for AnnotationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for AnnotationErrors {}

/// Whether a map has any `kinfer.dev/` annotation at all (the webhook's scope).
pub fn has_kinfer_annotations<'a>(keys: impl IntoIterator<Item = &'a String>) -> bool {
    keys.into_iter().any(|k| k.starts_with(PREFIX))
}

/// Parses every `kinfer.dev/*` annotation; other annotations are ignored.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Parsed, AnnotationErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut spec = KinferSpec {
        gpu_count: 1,
        ..KinferSpec::default()
    };
    // GPU-only annotations that were set, to check against the accelerator afterwards.
    let mut gpu_only: Vec<(&'static str, &str)> = Vec::new();
    let mut accelerator_set = false;
    let mut accelerator_invalid = false;

    for (key, value) in annotations {
        if !key.starts_with(PREFIX) || POD_BOOKKEEPING_ANNOTATIONS.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            ACCELERATOR => {
                accelerator_set = true;
                match one_of(ACCELERATOR, value, Accelerator::ALLOWED) {
                    Ok("cpu") => spec.accelerator = Accelerator::Cpu,
                    Ok("gpu") => spec.accelerator = Accelerator::Gpu,
                    Ok(_) => {
                        spec.accelerator = Accelerator::Auto;
                        warnings.push(
                            "kinfer.dev/accelerator: auto is placed like gpu for now; the CPU variant and load balancing between them are not available yet".to_string(),
                        );
                    }
                    Err(e) => {
                        accelerator_invalid = true;
                        errors.push(e)
                    }
                }
            }
            GPU_COUNT => {
                gpu_only.push((GPU_COUNT, value));
                match value.parse::<u32>() {
                    Ok(n) if (1..=MAX_GPU_COUNT).contains(&n) && !value.starts_with('+') => {
                        spec.gpu_count = n
                    }
                    _ => errors.push(AnnotationError::InvalidValue {
                        key: GPU_COUNT,
                        value: value.clone(),
                        allowed: format!("allowed: a whole number from 1 to {MAX_GPU_COUNT}"),
                        hint: None,
                    }),
                }
            }
            GPU_SHARING => {
                gpu_only.push((GPU_SHARING, value));
                match one_of(GPU_SHARING, value, GpuSharing::ALLOWED) {
                    Ok("exclusive") => spec.gpu_sharing = GpuSharing::Exclusive,
                    Ok(_) => spec.gpu_sharing = GpuSharing::TimeSliced,
                    Err(e) => errors.push(e),
                }
            }
            GPU_RESOURCE => {
                gpu_only.push((GPU_RESOURCE, value));
                match check_extended_resource(value) {
                    Ok(()) => spec.gpu_resource = Some(value.clone()),
                    Err(why) => errors.push(AnnotationError::InvalidValue {
                        key: GPU_RESOURCE,
                        value: value.clone(),
                        allowed: "allowed: an extended resource name such as nvidia.com/gpu or nvidia.com/mig-1g.10gb".to_string(),
                        hint: Some(why),
                    }),
                }
            }
            MODEL_MEMORY => {
                gpu_only.push((MODEL_MEMORY, value));
                match parse_memory_mib(value) {
                    Ok(mib) => spec.model_memory_mib = Some(mib),
                    Err(why) => errors.push(AnnotationError::InvalidValue {
                        key: MODEL_MEMORY,
                        value: value.clone(),
                        allowed: "allowed: a positive memory quantity such as 6Gi, 16Gi or 24000Mi".to_string(),
                        hint: Some(why),
                    }),
                }
            }
            HANDLER => match parse_handler(value) {
                Ok(h) => spec.handler = Some(h),
                Err(why) => errors.push(AnnotationError::InvalidValue {
                    key: HANDLER,
                    value: value.clone(),
                    allowed: "allowed: module:function, a Python module path and a function name, e.g. model:predict or app.serve:handle".to_string(),
                    hint: Some(why),
                }),
            },
            AUTOSCALING => {
                if let Err(e) = one_of(AUTOSCALING, value, AUTOSCALING_MODES) {
                    errors.push(e);
                }
            }
            AUTOSCALING_GPU_TARGET => {
                let percent = value.trim_end_matches('%').parse::<f64>();
                if !percent.is_ok_and(|p| (1.0..=100.0).contains(&p)) {
                    errors.push(AnnotationError::InvalidValue {
                        key: AUTOSCALING_GPU_TARGET,
                        value: value.clone(),
                        allowed: "allowed: a GPU busy percentage from 1 to 100, e.g. 80".to_string(),
                        hint: None,
                    });
                }
            }
            unknown => errors.push(AnnotationError::UnknownKey {
                key: unknown.to_string(),
                suggestion: nearest_key(unknown),
            }),
        }
    }

    if accelerator_invalid {
        // Already reported; whether GPU-only annotations fit depends on the fix.
    } else if spec.accelerator == Accelerator::Cpu {
        let accelerator = if accelerator_set {
            "cpu"
        } else {
            "cpu (the default)"
        };
        for (key, value) in gpu_only {
            errors.push(AnnotationError::NeedsGpu {
                key,
                value: value.to_string(),
                accelerator,
            });
        }
    } else {
        if spec.gpu_resource.is_some() && spec.gpu_sharing == GpuSharing::TimeSliced {
            warnings.push(
                "kinfer.dev/gpu-resource overrides kinfer.dev/gpu-sharing: the pod requests the named resource as is".to_string(),
            );
        }
        if spec.gpu_sharing == GpuSharing::TimeSliced && spec.gpu_count > 1 {
            warnings.push(format!(
                "kinfer.dev/gpu-count: {} with time-sliced sharing gives {} time slices, not more compute: slices share one GPU's time equally",
                spec.gpu_count, spec.gpu_count
            ));
        }
    }

    if errors.is_empty() {
        Ok(Parsed { spec, warnings })
    } else {
        Err(AnnotationErrors(errors))
    }
}

/// `value` must be one of `allowed`; a case or whitespace slip gets a "did you mean".
fn one_of<'a>(
    key: &'static str,
    value: &str,
    allowed: &'a [&'a str],
) -> Result<&'a str, AnnotationError> {
    if let Some(v) = allowed.iter().find(|a| **a == value) {
        return Ok(v);
    }
    let folded = value.trim().to_ascii_lowercase();
    let hint = allowed
        .iter()
        .find(|a| **a == folded)
        .or_else(|| {
            allowed
                .iter()
                // Short values ("tpu") are too close to everything to guess.
                .filter(|a| folded.len() > 3 && edit_distance(a, &folded) <= 2)
                .min_by_key(|a| edit_distance(a, &folded))
        })
        .map(|a| format!("did you mean {a}?"));
    Err(AnnotationError::InvalidValue {
        key,
        value: value.to_string(),
        allowed: format!("allowed: {}", allowed.join(", ")),
        hint,
    })
}

/// The known key nearest to an unknown one, if it is near enough to be a typo.
pub fn nearest_key(unknown: &str) -> Option<&'static str> {
    let lower = unknown.to_ascii_lowercase();
    let name = lower.strip_prefix(PREFIX).unwrap_or(&lower);
    let names: Vec<&'static str> = KNOWN_KEYS.iter().map(|k| &k[PREFIX.len()..]).collect();
    let found = nearest_in(name, &names)?;
    KNOWN_KEYS
        .iter()
        .copied()
        .find(|k| &k[PREFIX.len()..] == found)
}

/// The candidate nearest to `unknown` by edit distance, if close enough to be a typo (at most
/// a third of the candidate's length, and at least 2 edits allowed).
pub fn nearest_in<'a>(unknown: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (*c, edit_distance(c, unknown)))
        .filter(|(c, d)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(_, d)| *d)
        .map(|(c, _)| c)
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Checks an extended resource name the way Kubernetes does: a qualified name with a domain
/// prefix outside `kubernetes.io`, e.g. `nvidia.com/gpu`.
pub fn check_extended_resource(name: &str) -> Result<(), String> {
    let Some((prefix, local)) = name.split_once('/') else {
        return Err("it needs a domain prefix, like nvidia.com/".to_string());
    };
    if prefix.is_empty()
        || prefix.len() > 253
        || !prefix.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
    {
        return Err(format!("{prefix:?} is not a lower-case DNS domain"));
    }
    if prefix == "kubernetes.io" || prefix.ends_with(".kubernetes.io") {
        return Err("the kubernetes.io domain is reserved for built-in resources".to_string());
    }
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    if local.is_empty()
        || local.len() > 63
        || !local
            .bytes()
            .all(|b| alnum(b) || b == b'-' || b == b'_' || b == b'.')
        || !local.bytes().next().is_some_and(alnum)
        || !local.bytes().last().is_some_and(alnum)
    {
        return Err(format!(
            "{local:?} must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// Parses a Kubernetes memory quantity (`6Gi`, `500M`, `1.5Gi`, `1e9`, `2048`) into MiB,
/// rounded up. Milli-units and values below one byte are refused.
pub fn parse_memory_mib(value: &str) -> Result<u64, String> {
    const MIB: u128 = 1 << 20;
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if number.is_empty() || (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err("expected a number followed by an optional unit".to_string());
    }
    if int.len() + frac.len() > 30 {
        return Err("the number is too long".to_string());
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        s if s.starts_with(['e', 'E']) => match s[1..].parse::<u32>() {
            Ok(exp) if exp <= 18 => 10u128.pow(exp),
            _ => return Err(format!("unit {s:?}: exponent must be 0 to 18")),
        },
        "m" => return Err("milli-units (m) make no sense for memory".to_string()),
        s => {
            return Err(format!(
                "unknown unit {s:?}; use Ki, Mi, Gi, Ti, Pi or k, M, G, T, P"
            ));
        }
    };
    let digits: u128 = format!("{int}{frac}")
        .parse()
        .map_err(|_| "expected a number".to_string())?;
    let scale = 10u128.pow(frac.len() as u32);
    let bytes = digits
        .checked_mul(multiplier)
        .ok_or_else(|| "the quantity is too large".to_string())?
        .div_ceil(scale);
    if bytes == 0 {
        return Err("it must be more than zero".to_string());
    }
    let mib = bytes.div_ceil(MIB);
    // A label comparison needs an int64; stay far inside it.
    u64::try_from(mib)
        .ok()
        .filter(|m| *m < (1u64 << 40))
        .ok_or_else(|| "the quantity is too large".to_string())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Parses `module:function`; module is a dotted path of Python identifiers.
pub fn parse_handler(value: &str) -> Result<Handler, String> {
    let Some((module, function)) = value.split_once(':') else {
        return Err("missing ':' between module and function".to_string());
    };
    if module.is_empty() || !module.split('.').all(is_identifier) {
        return Err(format!("{module:?} is not a Python module path"));
    }
    if !is_identifier(function) {
        return Err(format!("{function:?} is not a Python function name"));
    }
    Ok(Handler {
        module: module.to_string(),
        function: function.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn messages(pairs: &[(&str, &str)]) -> String {
        parse(&map(pairs)).expect_err("expected errors").to_string()
    }

    #[test]
    fn the_pool_controllers_bookkeeping_on_warm_pods_is_not_an_error() {
        let annotations: BTreeMap<String, String> = [
            (ACCELERATOR, "gpu"),
            ("kinfer.dev/pod-template-hash", "5885764c58"),
            ("kinfer.dev/handoff-time", "2026-11-27T20:54:37.405961Z"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let parsed = parse(&annotations).expect("warm pods must pass the webhook");
        assert_eq!(parsed.spec.accelerator, Accelerator::Gpu);
    }

    #[test]
    fn defaults_and_full_gpu_spec() {
        let parsed = parse(&map(&[("app", "x")])).unwrap();
        assert_eq!(parsed.spec.accelerator, Accelerator::Cpu);
        assert_eq!(parsed.spec.gpu_count, 1);
        assert!(parsed.spec.is_noop());
        assert!(parsed.warnings.is_empty());

        let parsed = parse(&map(&[
            (ACCELERATOR, "gpu"),
            (GPU_COUNT, "2"),
            (GPU_SHARING, "exclusive"),
            (GPU_RESOURCE, "nvidia.com/mig-1g.10gb"),
            (MODEL_MEMORY, "40Gi"),
            (HANDLER, "pkg.model:predict"),
        ]))
        .unwrap();
        assert_eq!(
            parsed.spec,
            KinferSpec {
                accelerator: Accelerator::Gpu,
                gpu_count: 2,
                gpu_sharing: GpuSharing::Exclusive,
                gpu_resource: Some("nvidia.com/mig-1g.10gb".into()),
                model_memory_mib: Some(40 * 1024),
                handler: Some(Handler {
                    module: "pkg.model".into(),
                    function: "predict".into()
                }),
            }
        );
        assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
    }

    #[test]
    fn autoscaling_annotations_are_checked_and_change_no_pod() {
        let parsed = parse(&map(&[
            (AUTOSCALING, "gpu"),
            (AUTOSCALING_GPU_TARGET, "75"),
        ]))
        .unwrap();
        assert!(parsed.spec.is_noop());
        for mode in ["requests", "combined", "off"] {
            assert!(parse(&map(&[(AUTOSCALING, mode)])).is_ok(), "{mode}");
        }
        let msg = messages(&[(AUTOSCALING, "GPU"), (AUTOSCALING_GPU_TARGET, "0")]);
        assert!(
            msg.contains("kinfer.dev/autoscaling: invalid value \"GPU\"")
                && msg.contains("requests, gpu, combined, off")
                && msg.contains("did you mean gpu?"),
            "{msg}"
        );
        assert!(
            msg.contains("kinfer.dev/autoscaling-gpu-target: invalid value \"0\""),
            "{msg}"
        );
        assert!(messages(&[(AUTOSCALING_GPU_TARGET, "150")]).contains("1 to 100"));
    }

    #[test]
    fn auto_is_gpu_with_a_warning() {
        let parsed = parse(&map(&[(ACCELERATOR, "auto")])).unwrap();
        assert!(parsed.spec.accelerator.wants_gpu());
        assert_eq!(parsed.warnings.len(), 1);
        assert!(parsed.warnings[0].contains("placed like gpu"));
    }

    #[test]
    fn handler_only_is_a_cpu_spec() {
        let parsed = parse(&map(&[(HANDLER, "model:predict")])).unwrap();
        assert_eq!(parsed.spec.accelerator, Accelerator::Cpu);
        assert!(!parsed.spec.is_noop());
        assert_eq!(parsed.spec.handler.unwrap().to_string(), "model:predict");
    }

    #[test]
    fn error_messages_name_annotation_value_and_allowed() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[(ACCELERATOR, "tpu")],
                "annotation kinfer.dev/accelerator: invalid value \"tpu\": allowed: cpu, gpu, auto",
            ),
            (
                &[(ACCELERATOR, "GPU")],
                "annotation kinfer.dev/accelerator: invalid value \"GPU\": allowed: cpu, gpu, auto (did you mean gpu?)",
            ),
            (
                &[(ACCELERATOR, "gpu"), (GPU_COUNT, "0")],
                "annotation kinfer.dev/gpu-count: invalid value \"0\": allowed: a whole number from 1 to 64",
            ),
            (
                &[(ACCELERATOR, "gpu"), (GPU_COUNT, "two")],
                "annotation kinfer.dev/gpu-count: invalid value \"two\"",
            ),
            (&[(ACCELERATOR, "gpu"), (GPU_COUNT, "1000")], "from 1 to 64"),
            (
                &[(ACCELERATOR, "gpu"), (GPU_SHARING, "mps")],
                "annotation kinfer.dev/gpu-sharing: invalid value \"mps\": allowed: exclusive, time-sliced",
            ),
            (
                &[(ACCELERATOR, "gpu"), (GPU_SHARING, "timesliced")],
                "(did you mean time-sliced?)",
            ),
            (
                &[(ACCELERATOR, "gpu"), (GPU_RESOURCE, "gpu")],
                "annotation kinfer.dev/gpu-resource: invalid value \"gpu\": allowed: an extended resource name such as nvidia.com/gpu or nvidia.com/mig-1g.10gb (it needs a domain prefix, like nvidia.com/)",
            ),
            (
                &[(ACCELERATOR, "gpu"), (GPU_RESOURCE, "kubernetes.io/gpu")],
                "reserved",
            ),
            (
                &[(ACCELERATOR, "gpu"), (MODEL_MEMORY, "6GB")],
                "annotation kinfer.dev/model-memory: invalid value \"6GB\": allowed: a positive memory quantity such as 6Gi, 16Gi or 24000Mi (unknown unit \"GB\"; use Ki, Mi, Gi, Ti, Pi or k, M, G, T, P)",
            ),
            (
                &[(ACCELERATOR, "gpu"), (MODEL_MEMORY, "0")],
                "more than zero",
            ),
            (
                &[(HANDLER, "model.predict")],
                "annotation kinfer.dev/handler: invalid value \"model.predict\": allowed: module:function, a Python module path and a function name, e.g. model:predict or app.serve:handle (missing ':' between module and function)",
            ),
            (
                &[(HANDLER, "model:pre-dict")],
                "is not a Python function name",
            ),
            (
                &[(HANDLER, "1model:predict")],
                "is not a Python module path",
            ),
            (
                &[("kinfer.dev/acelerator", "gpu")],
                "unknown annotation kinfer.dev/acelerator (did you mean kinfer.dev/accelerator?)",
            ),
            (
                &[("kinfer.dev/gpu_count", "1")],
                "(did you mean kinfer.dev/gpu-count?)",
            ),
            (
                &[("kinfer.dev/modelmemory", "1Gi")],
                "(did you mean kinfer.dev/model-memory?)",
            ),
            (
                &[("kinfer.dev/Handler", "m:f")],
                "(did you mean kinfer.dev/handler?)",
            ),
            (
                &[("kinfer.dev/replicas", "3")],
                "unknown annotation kinfer.dev/replicas; known kinfer annotations: kinfer.dev/accelerator, kinfer.dev/gpu-count",
            ),
            (
                &[(ACCELERATOR, "cpu"), (GPU_COUNT, "2")],
                "annotation kinfer.dev/gpu-count: \"2\" needs a GPU, but kinfer.dev/accelerator is cpu; set kinfer.dev/accelerator: gpu (or auto), or remove kinfer.dev/gpu-count",
            ),
            (
                &[(MODEL_MEMORY, "40Gi")],
                "annotation kinfer.dev/model-memory: \"40Gi\" needs a GPU, but kinfer.dev/accelerator is cpu (the default)",
            ),
            (
                &[(GPU_SHARING, "time-sliced")],
                "kinfer.dev/gpu-sharing: \"time-sliced\" needs a GPU",
            ),
            (
                &[(GPU_RESOURCE, "nvidia.com/gpu")],
                "kinfer.dev/gpu-resource: \"nvidia.com/gpu\" needs a GPU",
            ),
        ];
        for (pairs, want) in cases {
            let got = messages(pairs);
            assert!(got.contains(want), "{pairs:?}:\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let errs = parse(&map(&[
            (ACCELERATOR, "fast"),
            (GPU_COUNT, "-1"),
            ("kinfer.dev/handlr", "m:f"),
        ]))
        .unwrap_err();
        assert_eq!(errs.0.len(), 3, "{errs}");
        assert!(matches!(errs.0[2], AnnotationError::UnknownKey { .. }));
    }

    #[test]
    fn sharing_warnings() {
        let parsed = parse(&map(&[
            (ACCELERATOR, "gpu"),
            (GPU_SHARING, "time-sliced"),
            (GPU_COUNT, "2"),
        ]))
        .unwrap();
        assert_eq!(parsed.spec.gpu_sharing, GpuSharing::TimeSliced);
        assert!(parsed.warnings[0].contains("not more compute"));
        let parsed = parse(&map(&[
            (ACCELERATOR, "gpu"),
            (GPU_SHARING, "time-sliced"),
            (GPU_RESOURCE, "nvidia.com/mig-1g.10gb.shared"),
        ]))
        .unwrap();
        assert!(parsed.warnings[0].contains("overrides"));
    }

    #[test]
    fn memory_quantities() {
        let cases = [
            ("6Gi", 6144),
            ("40Gi", 40960),
            ("24000Mi", 24000),
            ("1.5Gi", 1536),
            ("1Mi", 1),
            ("1", 1),
            ("1048577", 2),
            ("16G", 15259),
            ("1e9", 954),
            ("0.5Ki", 1),
            ("2Ti", 2 * 1024 * 1024),
        ];
        for (q, mib) in cases {
            assert_eq!(parse_memory_mib(q), Ok(mib), "{q}");
        }
        for bad in [
            "", "Gi", "-1Gi", "1.2.3Gi", "100m", "1e40", "5 Gi", "1gi", ".", "9e18Pi",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("gpu", "gpu"), 0);
        assert_eq!(nearest_key("kinfer.dev/gpucount"), Some(GPU_COUNT));
        assert_eq!(nearest_key("kinfer.dev/zzzzzzzzzzz"), None);
    }

    #[test]
    fn non_kinfer_annotations_are_ignored() {
        let parsed = parse(&map(&[
            ("autoscaling.knative.dev/target", "10"),
            ("kinfer.devx/foo", "bar"),
        ]))
        .unwrap();
        assert!(parsed.spec.is_noop());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The parser never panics, whatever the keys and values.
        #[test]
        fn parser_never_panics(
            entries in proptest::collection::btree_map(
                proptest::prop_oneof![
                    proptest::sample::select(KNOWN_KEYS).prop_map(String::from),
                    "kinfer\\.dev/[a-zA-Z_.-]{0,20}",
                    "\\PC{0,30}",
                ],
                proptest::prop_oneof![
                    "[0-9]{0,40}(\\.[0-9]{0,10})?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P|m|e[0-9]{1,3}|E[0-9]{1,3})?",
                    "[a-z._]{0,10}:[a-z_]{0,10}",
                    "[a-z0-9.-]{0,20}/[a-zA-Z0-9._-]{0,70}",
                    "\\PC{0,40}",
                    proptest::sample::select(&["cpu", "gpu", "auto", "time-sliced", "exclusive"][..]).prop_map(String::from),
                ],
                0..8,
            )
        ) {
            match parse(&entries) {
                Ok(parsed) => {
                    proptest::prop_assert!(parsed.spec.gpu_count >= 1);
                    if let Some(m) = parsed.spec.model_memory_mib { proptest::prop_assert!(m >= 1); }
                }
                Err(errors) => {
                    proptest::prop_assert!(!errors.0.is_empty());
                    proptest::prop_assert!(!errors.to_string().is_empty());
                }
            }
        }
    }

    use proptest::strategy::Strategy as _;
}
