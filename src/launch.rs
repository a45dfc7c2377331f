//! A small interpreter of ROS 2 XML launch files, for machines without `ros2 launch` (it is not on
//! PyPI). `aerokv swarm` uses it to start exactly the processes our launch files describe, from
//! the same files and parameters. It supports the subset our files use: `arg`, `let`, `node`,
//! `param` (`from` and `name`/`value`), `include` with nested `arg`, `group`,
//! `push-ros-namespace`, and the substitutions `$(var)`, `$(find-pkg-share)`, `$(env)`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{file}: cannot read: {source}")]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{file}: not valid XML: {source}")]
    Xml { file: PathBuf, source: roxmltree::Error },
    #[error("{file}: <{tag}> needs attribute `{attr}`")]
    MissingAttr { file: PathBuf, tag: String, attr: String },
    #[error("{file}: unknown launch argument `{name}` (declare it with <arg>)")]
    UnknownArg { file: PathBuf, name: String },
    #[error("{file}: argument `{name}` has no value and no default")]
    NoValue { file: PathBuf, name: String },
    #[error("{file}: unsupported element <{tag}>")]
    Unsupported { file: PathBuf, tag: String },
    #[error("{file}: bad substitution `{text}`: {why}")]
    Substitution { file: PathBuf, text: String, why: String },
}

/// One process to start.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProcess {
    pub package: String,
    pub executable: String,
    pub name: String,
    pub namespace: String,
    pub params_files: Vec<PathBuf>,
    pub params: Vec<(String, String)>,
}

impl NodeProcess {
    /// The ROS command-line arguments `ros2 launch` would pass.
    pub fn ros_args(&self) -> Vec<String> {
        let mut a = vec!["--ros-args".to_string(), "-r".into(), format!("__node:={}", self.name)];
        if !self.namespace.is_empty() {
            a.push("-r".into());
            a.push(format!("__ns:={}", self.namespace));
        }
        for f in &self.params_files {
            a.push("--params-file".into());
            a.push(f.display().to_string());
        }
        for (k, v) in &self.params {
            // rcl refuses `-p name:=`; YAML's '' is the empty string a launch file's value="" is.
            let v = if v.is_empty() { "''" } else { v.as_str() };
            a.push("-p".into());
            a.push(format!("{k}:={v}"));
        }
        a
    }

    /// Fully qualified node name, e.g. `/uav2/shard_executor`.
    pub fn fqn(&self) -> String {
        format!("{}/{}", self.namespace.trim_end_matches('/'), self.name)
    }
}

/// Resolves `$(find-pkg-share PKG)`; only our own package is known.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub package: String,
    pub share_dir: PathBuf,
}

impl Launcher {
    pub fn new(share_dir: impl Into<PathBuf>) -> Self {
        Launcher { package: "aerokv".into(), share_dir: share_dir.into() }
    }

    /// The node processes `file` starts with the given argument values.
    pub fn load(&self, file: &Path, args: &[(&str, &str)]) -> Result<Vec<NodeProcess>, LaunchError> {
        let given: HashMap<String, String> = args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut out = Vec::new();
        self.load_file(file, given, "", &mut out)?;
        Ok(out)
    }

    fn load_file(
        &self,
        file: &Path,
        given: HashMap<String, String>,
        ns: &str,
        out: &mut Vec<NodeProcess>,
    ) -> Result<(), LaunchError> {
        let text = std::fs::read_to_string(file).map_err(|source| LaunchError::Read { file: file.into(), source })?;
        let doc = roxmltree::Document::parse(&text).map_err(|source| LaunchError::Xml { file: file.into(), source })?;
        let root = doc.root_element();
        if root.tag_name().name() != "launch" {
            return Err(LaunchError::Unsupported { file: file.into(), tag: root.tag_name().name().into() });
        }
        // Arguments given by the includer must be declared by the included file.
        let declared: Vec<String> = root
            .children()
            .filter(|n| n.has_tag_name("arg"))
            .filter_map(|n| n.attribute("name").map(String::from))
            .collect();
        if let Some(name) = given.keys().find(|k| !declared.contains(k)) {
            return Err(LaunchError::UnknownArg { file: file.into(), name: name.clone() });
        }
        let mut scope = Scope { file: file.to_path_buf(), vars: HashMap::new(), given, ns: ns.to_string() };
        self.walk(root, &mut scope, out)
    }

    fn walk(&self, el: roxmltree::Node, scope: &mut Scope, out: &mut Vec<NodeProcess>) -> Result<(), LaunchError> {
        for child in el.children().filter(|n| n.is_element()) {
            let tag = child.tag_name().name();
            match tag {
                "arg" => {
                    let name = scope.attr(child, "name")?;
                    let value = match scope.given.get(&name) {
                        Some(v) => v.clone(),
                        None => match child.attribute("default") {
                            Some(d) => self.subst(d, scope)?,
                            None => return Err(LaunchError::NoValue { file: scope.file.clone(), name }),
                        },
                    };
                    scope.vars.insert(name, value);
                }
                "let" => {
                    let name = scope.attr(child, "name")?;
                    let value = self.subst(&scope.attr(child, "value")?, scope)?;
                    scope.vars.insert(name, value);
                }
                "push-ros-namespace" => {
                    let ns = self.subst(&scope.attr(child, "namespace")?, scope)?;
                    scope.ns = join_ns(&scope.ns, &ns);
                }
                "group" => {
                    let mut inner = scope.clone();
                    if let Some(ns) = child.attribute("namespace") {
                        inner.ns = join_ns(&scope.ns, &self.subst(ns, scope)?);
                    }
                    self.walk(child, &mut inner, out)?;
                }
                "include" => {
                    let file = PathBuf::from(self.subst(&scope.attr(child, "file")?, scope)?);
                    let mut given = HashMap::new();
                    for a in child.children().filter(|n| n.has_tag_name("arg")) {
                        given.insert(scope.attr(a, "name")?, self.subst(&scope.attr(a, "value")?, scope)?);
                    }
                    self.load_file(&file, given, &scope.ns, out)?;
                }
                "node" if self.condition(child, scope)? => out.push(self.node(child, scope)?),
                "node" => {}
                _ => return Err(LaunchError::Unsupported { file: scope.file.clone(), tag: tag.into() }),
            }
        }
        Ok(())
    }

    /// A node's `if` / `unless` attribute (true, false, 1, 0), as `ros2 launch` reads it.
    fn condition(&self, el: roxmltree::Node, scope: &Scope) -> Result<bool, LaunchError> {
        let mut keep = true;
        for (attr, wanted) in [("if", true), ("unless", false)] {
            if let Some(v) = el.attribute(attr) {
                let v = self.subst(v, scope)?;
                let b = match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(scope.bad(&v, &format!("`{attr}` must be true or false"))),
                };
                keep &= b == wanted;
            }
        }
        Ok(keep)
    }

    fn node(&self, el: roxmltree::Node, scope: &Scope) -> Result<NodeProcess, LaunchError> {
        let executable = self.subst(&scope.attr(el, "exec")?, scope)?;
        let namespace = match el.attribute("namespace") {
            Some(ns) => join_ns(&scope.ns, &self.subst(ns, scope)?),
            None => scope.ns.clone(),
        };
        let mut node = NodeProcess {
            package: self.subst(&scope.attr(el, "pkg")?, scope)?,
            name: match el.attribute("name") {
                Some(n) => self.subst(n, scope)?,
                None => executable.clone(),
            },
            executable,
            namespace,
            params_files: Vec::new(),
            params: Vec::new(),
        };
        for p in el.children().filter(|n| n.is_element()) {
            match p.tag_name().name() {
                "param" => {
                    if let Some(from) = p.attribute("from") {
                        node.params_files.push(PathBuf::from(self.subst(from, scope)?));
                    } else {
                        node.params.push((scope.attr(p, "name")?, self.subst(&scope.attr(p, "value")?, scope)?));
                    }
                }
                "remap" | "env" => {} // none of our nodes use them
                tag => return Err(LaunchError::Unsupported { file: scope.file.clone(), tag: tag.into() }),
            }
        }
        Ok(node)
    }

    fn subst(&self, text: &str, scope: &Scope) -> Result<String, LaunchError> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("$(") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let j = after.find(')').ok_or_else(|| scope.bad(text, "missing `)`"))?;
            let mut words = after[..j].split_whitespace();
            let value = match (words.next(), words.next(), words.next()) {
                (Some("var"), Some(name), None) => {
                    scope.vars.get(name).cloned().ok_or_else(|| scope.bad(text, &format!("no argument `{name}`")))?
                }
                (Some("find-pkg-share"), Some(pkg), None) if pkg == self.package => {
                    self.share_dir.display().to_string()
                }
                (Some("find-pkg-share"), Some(pkg), None) => {
                    return Err(scope.bad(text, &format!("unknown package `{pkg}`")))
                }
                (Some("env"), Some(name), default) => std::env::var(name)
                    .ok()
                    .or(default.map(String::from))
                    .ok_or_else(|| scope.bad(text, &format!("environment variable `{name}` is not set")))?,
                _ => return Err(scope.bad(text, "unsupported substitution")),
            };
            out.push_str(&value);
            rest = &after[j + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[derive(Clone)]
struct Scope {
    file: PathBuf,
    vars: HashMap<String, String>,
    given: HashMap<String, String>,
    ns: String,
}

impl Scope {
    fn attr(&self, el: roxmltree::Node, name: &str) -> Result<String, LaunchError> {
        el.attribute(name).map(String::from).ok_or_else(|| LaunchError::MissingAttr {
            file: self.file.clone(),
            tag: el.tag_name().name().into(),
            attr: name.into(),
        })
    }
    fn bad(&self, text: &str, why: &str) -> LaunchError {
        LaunchError::Substitution { file: self.file.clone(), text: text.into(), why: why.into() }
    }
}

fn join_ns(base: &str, ns: &str) -> String {
    if ns.starts_with('/') {
        return ns.trim_end_matches('/').to_string();
    }
    let ns = ns.trim_matches('/');
    if ns.is_empty() {
        base.to_string()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn swarm_launch_file_starts_four_uavs_and_the_control_nodes() {
        let l = Launcher::new(share());
        let nodes = l.load(&share().join("launch/swarm.launch.xml"), &[]).expect("load");
        let fqns: Vec<String> = nodes.iter().map(|n| n.fqn()).collect();
        assert_eq!(fqns.len(), 10, "{fqns:?}");
        assert!(fqns.contains(&"/aerokv/scheduler".to_string()));
        assert!(fqns.contains(&"/uav4/shard_executor".to_string()));
        let bm3 = nodes.iter().find(|n| n.fqn() == "/uav3/battery_monitor").expect("uav3");
        assert_eq!(bm3.params[0], ("initial_soc".to_string(), "0.6".to_string()));
        assert_eq!(bm3.params_files, vec![share().join("config/uav.yaml")]);
        let args = bm3.ros_args();
        assert!(args.windows(2).any(|w| w[0] == "-r" && w[1] == "__ns:=/uav3"), "{args:?}");
        // An empty value reaches rcl as YAML's empty string (rcl refuses `-p name:=`).
        assert!(args.windows(2).any(|w| w[0] == "-p" && w[1] == "px4_namespace:=''"), "{args:?}");
    }

    #[test]
    fn the_standby_scheduler_starts_only_when_asked() {
        let l = Launcher::new(share());
        let file = share().join("launch/control.launch.xml");
        let fqns = |args: &[(&str, &str)]| l.load(&file, args).unwrap().iter().map(|n| n.fqn()).collect::<Vec<_>>();
        assert_eq!(fqns(&[]), ["/aerokv/scheduler", "/aerokv/watchdog"]);
        let nodes = l.load(&file, &[("standby", "true")]).unwrap();
        let standby = nodes.iter().find(|n| n.fqn() == "/aerokv/standby/scheduler").expect("standby");
        assert!(standby.params.contains(&("role".to_string(), "standby".to_string())));
        assert!(matches!(l.load(&file, &[("standby", "maybe")]), Err(LaunchError::Substitution { .. })));
    }

    #[test]
    fn include_arguments_are_checked() {
        let l = Launcher::new(share());
        let err = l.load(&share().join("launch/uav.launch.xml"), &[("uav_idd", "x")]).unwrap_err();
        assert!(err.to_string().contains("uav_idd"), "{err}");
        let nodes = l.load(&share().join("launch/uav.launch.xml"), &[("uav_id", "uav9")]).expect("load");
        assert!(nodes.iter().all(|n| n.namespace == "/uav9"));
    }
}
