//! Node parameters from ROS 2 parameter files (`ros__parameters`), typed and validated.
//!
//! ROS tools start a node as `exe --ros-args --params-file FILE -p name:=value -r __ns:=/uav1`.
//! We read the same arguments (rcl reads them too) and deserialize the matching sections into
//! the node's typed parameter struct, so that a bad file is refused with the file and the field
//! named before the node starts.
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("{file}: cannot read parameter file: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: not valid YAML: {source}")]
    Yaml { file: PathBuf, source: serde_yaml::Error },
    #[error("{file}: section `{section}`: `ros__parameters` must be a mapping")]
    Section { file: PathBuf, section: String },
    #[error("{origin}: field `{field}`: {message}")]
    Field { origin: String, field: String, message: String },
    #[error("bad argument `{0}`: expected `-p name:=value`")]
    Override(String),
}

/// A parameter value its node cannot work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {message}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub message: String,
}

impl InvalidParam {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidParam { field, message: message.into() }
    }
}

/// Parameters whose values must make sense together (checked when the file is read).
pub trait Validate {
    fn validate(&self) -> Result<(), InvalidParam>;
}

/// Parameters `P` that passed [`Validate::validate`]: a node that takes `Checked<P>` refuses a bad
/// value like a bad type, before it starts, with the file and the field named.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked<P>(pub P);

impl<'de, P: serde::Deserialize<'de> + Validate> serde::Deserialize<'de> for Checked<P> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let p = P::deserialize(d)?;
        p.validate().map_err(serde::de::Error::custom)?;
        Ok(Checked(p))
    }
}

/// What the command line says about this node: its name, namespace, parameter files and overrides.
#[derive(Debug, Clone, Default)]
pub struct RosArgs {
    pub node_name: Option<String>,
    pub namespace: Option<String>,
    pub params_files: Vec<PathBuf>,
    pub overrides: Vec<(String, String)>,
}

impl RosArgs {
    /// Parses the `--ros-args ... [--]` part of `args` (the program name excluded).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ParamError> {
        let mut out = RosArgs::default();
        let mut in_ros = false;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--ros-args" => in_ros = true,
                "--" => in_ros = false,
                "--params-file" if in_ros => {
                    if let Some(f) = it.next() {
                        out.params_files.push(PathBuf::from(f));
                    }
                }
                "-p" | "--param" if in_ros => {
                    let kv = it.next().unwrap_or_default();
                    let (k, v) = kv.split_once(":=").ok_or_else(|| ParamError::Override(kv.clone()))?;
                    out.overrides.push((k.to_string(), v.to_string()));
                }
                "-r" | "--remap" if in_ros => {
                    if let Some(rule) = it.next() {
                        if let Some(ns) = rule.strip_prefix("__ns:=") {
                            out.namespace = Some(ns.to_string());
                        } else if let Some(name) = rule.strip_prefix("__node:=") {
                            out.node_name = Some(name.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    pub fn from_env() -> Result<Self, ParamError> {
        Self::parse(std::env::args().skip(1))
    }

    /// Fully qualified node name, e.g. `/uav1/shard_executor`.
    pub fn fqn(&self, default_name: &str) -> String {
        let name = self.node_name.as_deref().unwrap_or(default_name);
        match self.namespace.as_deref().map(|n| n.trim_matches('/')) {
            Some(ns) if !ns.is_empty() => format!("/{ns}/{name}"),
            _ => format!("/{name}"),
        }
    }

    /// The namespace without slashes ("" for the root namespace).
    pub fn namespace_leaf(&self) -> String {
        self.namespace.as_deref().unwrap_or("").trim_matches('/').rsplit('/').next().unwrap_or("").to_string()
    }

    /// Loads the typed parameters of node `default_name`: every matching file section, in order,
    /// then the `-p` overrides. Missing fields take the struct's serde defaults. The parameters
    /// every node has ([`Common`]) are not part of `P`. An error names the file (or override)
    /// that set the field.
    pub fn load<P: DeserializeOwned>(&self, default_name: &str) -> Result<P, ParamError> {
        let mut merged = self.merged(default_name)?;
        Common::take(&mut merged)?;
        let values = std::mem::take(&mut merged.values);
        from_mapping(values, &merged.last).map_err(|e| match e {
            ParamError::Field { field, message, .. } => {
                ParamError::Field { origin: merged.origin_of(&field), field, message }
            }
            e => e,
        })
    }

    /// The parameters every node has, from the same files and overrides.
    pub fn common(&self, default_name: &str) -> Result<Common, ParamError> {
        Common::take(&mut self.merged(default_name)?)
    }

    fn merged(&self, default_name: &str) -> Result<Merged, ParamError> {
        let fqn = self.fqn(default_name);
        let mut m = Merged { values: Mapping::new(), origins: BTreeMap::new(), last: String::from("parameters") };
        for file in &self.params_files {
            let section = read_sections(file, &fqn)?;
            for (k, v) in section {
                if let Some(k) = k.as_str() {
                    m.origins.insert(k.to_string(), file.display().to_string());
                }
                m.values.insert(k, v);
            }
            m.last = file.display().to_string();
        }
        for (k, v) in &self.overrides {
            let value: Value = serde_yaml::from_str(v).unwrap_or_else(|_| Value::String(v.clone()));
            m.values.insert(Value::String(k.clone()), value);
            m.origins.insert(k.clone(), format!("-p {k}:={v}"));
        }
        Ok(m)
    }
}

/// Every parameter file section and override for one node, merged, with where each value came from.
struct Merged {
    values: Mapping,
    /// Top-level key -> the file (or `-p` override) that set it last.
    origins: BTreeMap<String, String>,
    /// The last file read: the origin of defaults and of keys without one.
    last: String,
}

impl Merged {
    fn origin_of(&self, field: &str) -> String {
        let top = field.split(['.', '[']).next().unwrap_or(field);
        self.origins.get(top).cloned().unwrap_or_else(|| self.last.clone())
    }
}

/// Parameters of every node, besides its own: `use_sim_time` (every ROS node has it; a launch
/// under a simulator sets it on all of them) and `log_level`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Common {
    pub use_sim_time: bool,
    /// error, warn, info, debug or trace; `None`: `RUST_LOG`, else info.
    pub log_level: Option<String>,
}

impl Common {
    /// Takes the common parameters out of `merged`, checked.
    fn take(merged: &mut Merged) -> Result<Common, ParamError> {
        let (use_sim_time, log_level) = (merged.values.remove("use_sim_time"), merged.values.remove("log_level"));
        let field = |field: &str, message: String| ParamError::Field {
            origin: merged.origin_of(field),
            field: field.into(),
            message,
        };
        let mut common = Common::default();
        if let Some(v) = use_sim_time {
            common.use_sim_time =
                v.as_bool().ok_or_else(|| field("use_sim_time", format!("expected true or false, not {v:?}")))?;
        }
        if let Some(v) = log_level {
            let levels = crate::node_params::LOG_LEVELS;
            match v.as_str() {
                Some(l) if levels.contains(&l) => common.log_level = Some(l.to_string()),
                _ => return Err(field("log_level", format!("expected one of {}, not {v:?}", levels.join(", ")))),
            }
        }
        Ok(common)
    }
}

/// Deserializes `ros__parameters` into `P`, naming the field that is wrong.
pub fn from_mapping<P: DeserializeOwned>(map: Mapping, origin: &str) -> Result<P, ParamError> {
    serde_path_to_error::deserialize(Value::Mapping(map)).map_err(|err| {
        let field = err.path().to_string();
        let message = err.into_inner().to_string();
        // serde names an unknown field in the message, and so does a failed [`Validate`]; the
        // path then still points at the parent.
        if field == "." {
            if let Some((field, message)) = invalid_field(&message) {
                return ParamError::Field { origin: origin.to_string(), field, message };
            }
        }
        let field = if field == "." { unknown_field(&message).unwrap_or(field) } else { field };
        ParamError::Field { origin: origin.to_string(), field, message }
    })
}

/// The field and message of an [`InvalidParam`] passed through serde as text.
fn invalid_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("field `")?;
    let (field, message) = rest.split_once("`: ")?;
    Some((field.to_string(), message.to_string()))
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// The `ros__parameters` of every section of `file` that applies to node `fqn`.
fn read_sections(file: &Path, fqn: &str) -> Result<Mapping, ParamError> {
    let text = std::fs::read_to_string(file).map_err(|source| ParamError::Read { file: file.into(), source })?;
    let doc: Value = serde_yaml::from_str(&text).map_err(|source| ParamError::Yaml { file: file.into(), source })?;
    let mut out = Mapping::new();
    let Value::Mapping(sections) = doc else { return Ok(out) };
    for (key, body) in sections {
        let Some(pattern) = key.as_str() else { continue };
        if !section_matches(pattern, fqn) {
            continue;
        }
        let params = match &body {
            Value::Mapping(m) => m.get("ros__parameters").cloned().unwrap_or(Value::Null),
            _ => Value::Null,
        };
        match params {
            Value::Mapping(m) => out.extend(m),
            Value::Null => {}
            _ => return Err(ParamError::Section { file: file.into(), section: pattern.to_string() }),
        }
    }
    Ok(out)
}

/// ROS 2 parameter-file section matching: `/**`, `/**/name`, `/ns/name`, `ns/name`, `name`,
/// with `*` matching one path token.
fn section_matches(pattern: &str, fqn: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_start_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let name: Vec<&str> = fqn.trim_start_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    fn go(p: &[&str], n: &[&str]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(&"**"), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(a), Some(b)) => (*a == "*" || a == b) && go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(&pat, &name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct P {
        period_s: f64,
        uav_id: String,
    }
    impl Default for P {
        fn default() -> Self {
            P { period_s: 1.0, uav_id: "x".into() }
        }
    }

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::new(text)
    }

    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let p = std::env::temp_dir().join(format!(
                    "aerokv-params-{}-{}.yaml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).expect("temp file");
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn args(file: &Path, extra: &[&str]) -> RosArgs {
        let mut v = vec!["--ros-args".to_string(), "--params-file".into(), file.display().to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        RosArgs::parse(v).expect("args")
    }

    #[test]
    fn matching_sections_merge_in_order_and_overrides_win() {
        let f = write("/**:\n  ros__parameters:\n    period_s: 2.0\n/**/node:\n  ros__parameters:\n    uav_id: a\nother:\n  ros__parameters:\n    uav_id: b\n");
        let a = args(&f.0, &["-r", "__ns:=/uav3", "-p", "period_s:=0.5"]);
        let p: P = a.load("node").expect("load");
        assert_eq!(p, P { period_s: 0.5, uav_id: "a".into() });
        assert_eq!(a.fqn("node"), "/uav3/node");
        assert_eq!(a.namespace_leaf(), "uav3");
    }

    #[test]
    fn wrong_type_names_file_and_field() {
        let f = write("/**/node:\n  ros__parameters:\n    period_s: fast\n");
        let err = args(&f.0, &[]).load::<P>("node").unwrap_err().to_string();
        assert!(err.contains(&f.0.display().to_string()) && err.contains("period_s"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let f = write("/**/node:\n  ros__parameters:\n    perod_s: 1.0\n");
        let err = args(&f.0, &[]).load::<P>("node").unwrap_err().to_string();
        assert!(err.contains("field `perod_s`"), "{err}");
    }

    impl Validate for P {
        fn validate(&self) -> Result<(), InvalidParam> {
            if self.period_s > 0.0 {
                Ok(())
            } else {
                Err(InvalidParam::new("period_s", format!("must be positive, got {}", self.period_s)))
            }
        }
    }

    #[test]
    fn a_value_that_fails_validation_names_file_and_field() {
        let f = write("/**/node:\n  ros__parameters:\n    period_s: -2.0\n");
        let err = args(&f.0, &[]).load::<Checked<P>>("node").unwrap_err().to_string();
        assert_eq!(err, format!("{}: field `period_s`: must be positive, got -2", f.0.display()));
        let ok = args(&f.0, &["-p", "period_s:=3.0"]).load::<Checked<P>>("node").expect("valid");
        assert_eq!(ok.0.period_s, 3.0);
        // An override of another field (a launch file's) is not blamed for the file's value.
        let err = args(&f.0, &["-p", "uav_id:=x"]).load::<Checked<P>>("node").unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: field `period_s`", f.0.display())), "{err}");
        let err = args(&f.0, &["-p", "period_s:=-1.0"]).load::<Checked<P>>("node").unwrap_err().to_string();
        assert!(err.starts_with("-p period_s:=-1.0: field `period_s`"), "{err}");
    }

    #[test]
    fn use_sim_time_is_accepted_when_boolean() {
        let f = write("/**:\n  ros__parameters:\n    use_sim_time: true\n    uav_id: y\n");
        let p: P = args(&f.0, &[]).load("node").expect("load");
        assert_eq!(p.uav_id, "y");
        let err = args(&f.0, &["-p", "use_sim_time:=later"]).load::<P>("node").unwrap_err();
        assert!(err.to_string().contains("use_sim_time"), "{err}");
        let common = args(&f.0, &["-p", "log_level:=debug"]).common("node").expect("common");
        assert_eq!(common, Common { use_sim_time: true, log_level: Some("debug".into()) });
        let err = args(&f.0, &["-p", "log_level:=loud"]).load::<P>("node").unwrap_err();
        assert!(err.to_string().contains("log_level"), "{err}");
        // An empty value, as the launcher passes it.
        let p: P = args(&f.0, &["-p", "uav_id:=''"]).load("node").expect("load");
        assert_eq!(p.uav_id, "");
    }

    #[test]
    fn broken_yaml_and_missing_file_are_reported() {
        let f = write("/**/node:\n  ros__parameters:\n    a: [1,\n");
        assert!(matches!(args(&f.0, &[]).load::<P>("node"), Err(ParamError::Yaml { .. })));
        let missing = Path::new("/nonexistent/aerokv.yaml");
        assert!(matches!(args(missing, &[]).load::<P>("node"), Err(ParamError::Read { .. })));
    }

    #[test]
    fn section_patterns() {
        assert!(section_matches("/**", "/uav1/x"));
        assert!(section_matches("/**/x", "/uav1/x"));
        assert!(section_matches("/uav1/x", "/uav1/x"));
        assert!(section_matches("uav1/x", "/uav1/x"));
        assert!(section_matches("/*/x", "/uav1/x"));
        assert!(!section_matches("/uav2/x", "/uav1/x"));
        assert!(!section_matches("x", "/uav1/x"));
    }
}
