//! Structural checks of the build templates: the Tekton Task and TaskRun round-trip through
//! typed structs that reject unknown fields (a typo'd key fails here, not in the cluster),
//! every `$(params|workspaces|results...)` reference resolves, the example run satisfies the
//! Task, and the Dockerfile the Task embeds is the template.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

fn read(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: Option<String>,
    generate_name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Task {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: TaskSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TaskSpec {
    description: String,
    params: Vec<ParamSpec>,
    workspaces: Vec<WorkspaceDeclaration>,
    results: Vec<ResultDeclaration>,
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamSpec {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    description: String,
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkspaceDeclaration {
    name: String,
    description: String,
    #[serde(default)]
    optional: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultDeclaration {
    name: String,
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Step {
    name: String,
    image: String,
    working_dir: Option<String>,
    script: Option<String>,
    command: Option<Vec<String>>,
    args: Option<Vec<String>>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TaskRun {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: TaskRunSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TaskRunSpec {
    task_ref: TaskRef,
    params: Vec<Param>,
    workspaces: Vec<WorkspaceBinding>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskRef {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Param {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkspaceBinding {
    name: String,
    volume_claim_template: Option<serde_yaml::Value>,
    persistent_volume_claim: Option<serde_yaml::Value>,
    empty_dir: Option<serde_yaml::Value>,
    secret: Option<SecretVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecretVolume {
    secret_name: String,
}

/// Every `$(...)` variable in `text`.
fn variables(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("$(") {
        let after = &rest[start + 2..];
        let end = after.find(')').expect("unterminated $(");
        out.insert(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn task() -> (Task, String) {
    let text = read("tekton/task.yaml");
    (
        serde_yaml::from_str(&text).expect("task.yaml matches the Task schema"),
        text,
    )
}

#[test]
fn task_is_well_formed() {
    let (task, text) = task();
    assert_eq!(
        (task.api_version.as_str(), task.kind.as_str()),
        ("tekton.dev/v1", "Task")
    );
    let name = task.metadata.name.as_deref().expect("a Task has a name");
    assert!(is_dns_label(name), "{name}");
    assert!(task.metadata.generate_name.is_none());
    assert!(
        task.metadata
            .labels
            .contains_key("app.kubernetes.io/part-of")
    );
    assert!(!task.metadata.annotations.is_empty());
    assert!(!task.spec.description.is_empty());

    let params: BTreeSet<&str> = task.spec.params.iter().map(|p| p.name.as_str()).collect();
    let workspaces: BTreeSet<&str> = task
        .spec
        .workspaces
        .iter()
        .map(|w| w.name.as_str())
        .collect();
    let results: BTreeSet<&str> = task.spec.results.iter().map(|r| r.name.as_str()).collect();
    let steps: BTreeSet<&str> = task.spec.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(params.len(), task.spec.params.len(), "duplicate params");
    assert_eq!(
        workspaces.len(),
        task.spec.workspaces.len(),
        "duplicate workspaces"
    );
    assert_eq!(results.len(), task.spec.results.len(), "duplicate results");
    assert_eq!(steps.len(), task.spec.steps.len(), "duplicate steps");
    for p in &task.spec.params {
        assert_eq!(p.kind, "string", "param {}", p.name);
        assert!(!p.description.is_empty(), "param {}", p.name);
    }
    for r in &task.spec.results {
        assert!(!r.description.is_empty(), "result {}", r.name);
    }
    for w in &task.spec.workspaces {
        assert!(!w.description.is_empty(), "workspace {}", w.name);
    }
    for s in &task.spec.steps {
        assert!(is_dns_label(&s.name), "step name {}", s.name);
        assert!(!s.image.is_empty(), "step {}", s.name);
        // Tekton runs either a script or a command, not both.
        assert!(
            s.script.is_some() != s.command.is_some(),
            "step {}: script xor command",
            s.name
        );
        if let Some(script) = &s.script {
            assert!(
                script.starts_with("#!"),
                "step {}: script needs a shebang",
                s.name
            );
            assert!(s.args.is_none(), "step {}: args with a script", s.name);
        }
        for e in &s.env {
            assert!(!e.name.is_empty() && !e.value.is_empty());
        }
        let _ = &s.working_dir;
    }

    // Every reference resolves, and every param and result is used.
    let mut used_params = BTreeSet::new();
    let mut written_results = BTreeSet::new();
    for var in variables(&text) {
        let parts: Vec<&str> = var.split('.').collect();
        match parts.as_slice() {
            ["params", p] => {
                assert!(params.contains(p), "unknown param in $({var})");
                used_params.insert(p.to_string());
            }
            ["workspaces", w, "path"] => {
                assert!(workspaces.contains(w), "unknown workspace in $({var})")
            }
            ["results", r, "path"] => {
                assert!(results.contains(r), "unknown result in $({var})");
                written_results.insert(r.to_string());
            }
            // Shell command substitution inside scripts, e.g. $(git rev-parse HEAD).
            [cmd] if cmd.contains(' ') => {}
            _ => panic!("unexpected variable $({var})"),
        }
    }
    assert_eq!(
        used_params,
        params.iter().map(|p| p.to_string()).collect(),
        "unused params"
    );
    assert_eq!(
        written_results,
        results.iter().map(|r| r.to_string()).collect(),
        "unwritten results"
    );
}

#[test]
fn example_run_satisfies_the_task() {
    let (task, _) = task();
    let run: TaskRun = serde_yaml::from_str(&read("tekton/taskrun.yaml"))
        .expect("taskrun.yaml matches the TaskRun schema");
    assert_eq!(
        (run.api_version.as_str(), run.kind.as_str()),
        ("tekton.dev/v1", "TaskRun")
    );
    assert!(run.metadata.name.is_some() || run.metadata.generate_name.is_some());
    assert_eq!(
        Some(run.spec.task_ref.name.as_str()),
        task.metadata.name.as_deref()
    );

    let given: BTreeMap<&str, &str> = run
        .spec
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.value.as_str()))
        .collect();
    for name in given.keys() {
        assert!(
            task.spec.params.iter().any(|p| p.name == *name),
            "the Task has no param {name}"
        );
    }
    for p in task.spec.params.iter().filter(|p| p.default.is_none()) {
        assert!(
            given.contains_key(p.name.as_str()),
            "required param {} missing",
            p.name
        );
    }
    assert!(kinfer_wrapper::args::parse_handler(given["handler"]).is_ok());

    for w in &run.spec.workspaces {
        assert!(
            task.spec.workspaces.iter().any(|d| d.name == w.name),
            "the Task has no workspace {}",
            w.name
        );
        let sources = [
            w.volume_claim_template.is_some(),
            w.persistent_volume_claim.is_some(),
            w.empty_dir.is_some(),
            w.secret.as_ref().is_some_and(|s| !s.secret_name.is_empty()),
        ];
        assert_eq!(
            sources.iter().filter(|s| **s).count(),
            1,
            "workspace {} needs one volume source",
            w.name
        );
    }
    for d in task.spec.workspaces.iter().filter(|d| !d.optional) {
        assert!(
            run.spec.workspaces.iter().any(|w| w.name == d.name),
            "workspace {} not bound",
            d.name
        );
    }
}

#[test]
fn task_embeds_the_dockerfile_template() {
    let (task, _) = task();
    let template = read("templates/Dockerfile");
    let script = task
        .spec
        .steps
        .iter()
        .find_map(|s| s.script.as_deref().filter(|s| s.contains("<<'DOCKERFILE'")))
        .expect("a step writes the Dockerfile");
    let start = script.find("<<'DOCKERFILE'\n").unwrap() + "<<'DOCKERFILE'\n".len();
    let end = script[start..]
        .find("\nDOCKERFILE\n")
        .expect("heredoc terminator at column 0")
        + start
        + 1;
    assert_eq!(
        &script[start..end],
        template,
        "task.yaml's Dockerfile drifted from templates/Dockerfile"
    );
}

#[test]
fn dockerfiles_agree_on_the_wrapper_path() {
    let template = read("templates/Dockerfile");
    let wrapper = read("wrapper/Dockerfile");
    assert!(template.contains("COPY --from=wrapper /kinfer-wrapper /usr/local/bin/kinfer-wrapper"));
    assert!(template.contains(r#"ENTRYPOINT ["/usr/local/bin/kinfer-wrapper"]"#));
    assert!(template.contains("ENV KINFER_HANDLER=${HANDLER}"));
    assert!(wrapper.contains("COPY --from=build /kinfer-wrapper /kinfer-wrapper"));
    assert!(wrapper.contains(r#"ENTRYPOINT ["/kinfer-wrapper"]"#));
    // Every build stage the template names exists.
    let stages: Vec<&str> = template
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .collect();
    assert_eq!(stages, ["wrapper"]);
}
