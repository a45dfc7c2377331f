//! `ros2msg` schemas as rosbag2 writes them: the type's `.msg` text, then every type it uses
//! (nested ones too), each after a line of 80 `=` and `MSG: pkg/Name`. The `.msg` files are read
//! from the `share/<pkg>/msg/` directories of the ROS prefixes (AMENT_PREFIX_PATH).
use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("`{0}` is not a message type name (expected pkg/msg/Name)")]
    BadTypeName(String),
    #[error("no {file} under the share directories of {prefixes} (is its package on AMENT_PREFIX_PATH?)")]
    NotFound { file: String, prefixes: String },
    #[error("cannot read {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
}

/// A message type's package and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MsgType {
    pub package: String,
    pub name: String,
}

impl MsgType {
    /// `pkg/msg/Name` or `pkg/Name`.
    pub fn parse(full: &str) -> Result<Self, SchemaError> {
        let parts: Vec<&str> = full.split('/').collect();
        let (package, name) = match parts.as_slice() {
            [p, "msg", n] | [p, n] => (*p, *n),
            _ => return Err(SchemaError::BadTypeName(full.into())),
        };
        let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident(package) || !ident(name) {
            return Err(SchemaError::BadTypeName(full.into()));
        }
        Ok(MsgType { package: package.into(), name: name.into() })
    }
}

const PRIMITIVES: &[&str] = &[
    "bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
    "uint64", "string", "wstring",
];

/// The message types a `.msg` text's fields use (constants are always primitive).
pub fn field_types(text: &str, own_package: &str) -> Vec<MsgType> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            let token = line.split_whitespace().next()?;
            // Strip array (`[]`, `[3]`, `[<=3]`) and string bounds (`string<=8`).
            let base = token.split('[').next().unwrap_or(token);
            let base = base.split("<=").next().unwrap_or(base);
            if base.is_empty() || PRIMITIVES.contains(&base) {
                return None;
            }
            match base.split_once('/') {
                Some(_) => MsgType::parse(base).ok(),
                None => MsgType::parse(&format!("{own_package}/{base}")).ok(),
            }
        })
        .collect()
}

/// Where `.msg` files are looked up.
#[derive(Clone, Debug)]
pub struct MsgSearchPath {
    prefixes: Vec<PathBuf>,
}

impl MsgSearchPath {
    pub fn new(prefixes: Vec<PathBuf>) -> Self {
        MsgSearchPath { prefixes }
    }

    /// The prefixes of AMENT_PREFIX_PATH.
    pub fn from_env() -> Self {
        let value = std::env::var_os("AMENT_PREFIX_PATH").unwrap_or_default();
        MsgSearchPath::new(std::env::split_paths(&value).filter(|p| !p.as_os_str().is_empty()).collect())
    }

    fn read(&self, t: &MsgType) -> Result<String, SchemaError> {
        let rel = Path::new("share").join(&t.package).join("msg").join(format!("{}.msg", t.name));
        for prefix in &self.prefixes {
            let path = prefix.join(&rel);
            match std::fs::read_to_string(&path) {
                Ok(text) => return Ok(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(SchemaError::Io { path, err }),
            }
        }
        let prefixes = self.prefixes.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        Err(SchemaError::NotFound { file: rel.display().to_string(), prefixes })
    }

    /// The `ros2msg` schema of `type_name` (`pkg/msg/Name`) with its dependencies, breadth first.
    pub fn ros2msg(&self, type_name: &str) -> Result<String, SchemaError> {
        let root = MsgType::parse(type_name)?;
        let mut out = self.read(&root)?;
        let mut seen = BTreeSet::from([root.clone()]);
        let mut queue: VecDeque<MsgType> = field_types(&out, &root.package).into();
        while let Some(t) = queue.pop_front() {
            if !seen.insert(t.clone()) {
                continue;
            }
            let text = self.read(&t)?;
            queue.extend(field_types(&text, &t.package));
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&"=".repeat(80));
            out.push_str(&format!("\nMSG: {}/{}\n", t.package, t.name));
            out.push_str(&text);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, pkg: &str, name: &str, text: &str) {
        let d = dir.join("share").join(pkg).join("msg");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{name}.msg")), text).unwrap();
    }

    #[test]
    fn field_types_skip_primitives_constants_comments_and_bounds() {
        let text = "# a comment with pkg/Type\nuint8 OK=0\nstring<=8 name  # bounded\nfloat32[] v\n\
                    builtin_interfaces/Time stamp\nStatus[<=3] status\nother_pkg/msg/Thing thing 5\n\n";
        let got = field_types(text, "my_pkg");
        let names: Vec<String> = got.iter().map(|t| format!("{}/{}", t.package, t.name)).collect();
        assert_eq!(names, ["builtin_interfaces/Time", "my_pkg/Status", "other_pkg/Thing"]);
    }

    #[test]
    fn schema_lists_nested_dependencies_once_from_any_prefix() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(a.path(), "pkg", "Outer", "pkg/Inner first\nInner[] more\nbase/Time stamp\n");
        write(a.path(), "pkg", "Inner", "base/Time t\nint32 x\n");
        write(b.path(), "base", "Time", "int32 sec\nuint32 nanosec");
        let search = MsgSearchPath::new(vec![a.path().into(), b.path().into()]);
        let s = search.ros2msg("pkg/msg/Outer").unwrap();
        let sep = "=".repeat(80);
        assert_eq!(
            s,
            format!(
                "pkg/Inner first\nInner[] more\nbase/Time stamp\n{sep}\nMSG: pkg/Inner\nbase/Time t\nint32 x\n\
                 {sep}\nMSG: base/Time\nint32 sec\nuint32 nanosec"
            )
        );
        write(a.path(), "pkg", "Broken", "pkg/Missing m\n");
        let err = search.ros2msg("pkg/msg/Broken").unwrap_err().to_string();
        assert!(err.contains("share/pkg/msg/Missing.msg"), "{err}");
        assert!(matches!(search.ros2msg("no slashes"), Err(SchemaError::BadTypeName(_))));
        assert!(matches!(search.ros2msg("../x/msg/Y"), Err(SchemaError::BadTypeName(_))));
    }
}
