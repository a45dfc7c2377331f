//! A node's parameters as ROS 2 parameter services show them, without ROS: names, types, current
//! values, descriptions, ranges, and which may change while the node runs.
//!
//! The values live in the node's typed parameter struct `P` (the one `--params-file` fills). A
//! [`Table`] lists its fields (through serde), describes each from the node's [`Doc`]s, and sets
//! one by building a new `P` with the new value and checking it whole (type, range, the node's
//! own validation): a value the node could not work with is refused with the reason and nothing
//! changes. Fields without a doc, or whose doc says so, are read-only. Two parameters every node
//! has are not fields of `P`: `use_sim_time` (read-only) and `log_level` (live).
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_yaml::{Mapping, Value as Yaml};

/// A parameter value (the ROS parameter types this project uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Integer(i64),
    Double(f64),
    String(String),
    IntegerArray(Vec<i64>),
    DoubleArray(Vec<f64>),
    StringArray(Vec<String>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Integer(_) => "integer",
            Value::Double(_) => "double",
            Value::String(_) => "string",
            Value::IntegerArray(_) => "integer array",
            Value::DoubleArray(_) => "double array",
            Value::StringArray(_) => "string array",
        }
    }

    fn same_type(&self, other: &Value) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }

    fn to_yaml(&self) -> Yaml {
        match self {
            Value::Bool(b) => Yaml::Bool(*b),
            Value::Integer(i) => Yaml::Number((*i).into()),
            Value::Double(d) => Yaml::Number((*d).into()),
            Value::String(s) => Yaml::String(s.clone()),
            Value::IntegerArray(v) => Yaml::Sequence(v.iter().map(|i| Yaml::Number((*i).into())).collect()),
            Value::DoubleArray(v) => Yaml::Sequence(v.iter().map(|d| Yaml::Number((*d).into())).collect()),
            Value::StringArray(v) => Yaml::Sequence(v.iter().map(|s| Yaml::String(s.clone())).collect()),
        }
    }

    /// A serialized field as a parameter value (`None`: a shape ROS parameters cannot carry).
    fn from_yaml(v: &Yaml) -> Option<Value> {
        Some(match v {
            Yaml::Bool(b) => Value::Bool(*b),
            Yaml::Number(n) if n.is_f64() => Value::Double(n.as_f64()?),
            Yaml::Number(n) => Value::Integer(n.as_i64()?),
            Yaml::String(s) => Value::String(s.clone()),
            Yaml::Sequence(items) => {
                if items.iter().all(|i| matches!(i, Yaml::Number(n) if !n.is_f64())) {
                    Value::IntegerArray(items.iter().filter_map(Yaml::as_i64).collect())
                } else if items.iter().all(Yaml::is_number) {
                    Value::DoubleArray(items.iter().filter_map(Yaml::as_f64).collect())
                } else if items.iter().all(Yaml::is_string) {
                    Value::StringArray(items.iter().filter_map(|i| i.as_str().map(str::to_string)).collect())
                } else {
                    return None;
                }
            }
            _ => return None,
        })
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Integer(i) => Some(*i as f64),
            Value::Double(d) => Some(*d),
            _ => None,
        }
    }
}

/// How a parameter is described to ROS tools: what it is, its range, whether it is live.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Doc {
    pub name: &'static str,
    pub description: &'static str,
    /// Inclusive bounds of a number (the node's validation may be stricter: a positive period
    /// has the range 0..max and refuses 0).
    pub range: Option<(f64, f64)>,
    /// May be set while the node runs (the node applies it at once).
    pub live: bool,
}

impl Doc {
    /// A parameter read once at start.
    pub const fn fixed(name: &'static str, description: &'static str) -> Doc {
        Doc { name, description, range: None, live: false }
    }
    /// A number read once at start, within `lo..=hi`.
    pub const fn fixed_in(name: &'static str, description: &'static str, lo: f64, hi: f64) -> Doc {
        Doc { name, description, range: Some((lo, hi)), live: false }
    }
    /// A parameter the node follows while it runs.
    pub const fn live(name: &'static str, description: &'static str) -> Doc {
        Doc { name, description, range: None, live: true }
    }
    /// A number the node follows while it runs, within `lo..=hi`.
    pub const fn live_in(name: &'static str, description: &'static str, lo: f64, hi: f64) -> Doc {
        Doc { name, description, range: Some((lo, hi)), live: true }
    }
}

/// Everything `describe_parameters` says about one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub name: String,
    pub value: Value,
    pub description: String,
    pub range: Option<(f64, f64)>,
    pub read_only: bool,
}

/// Why a parameter was not set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetError {
    #[error("no parameter `{0}` on this node")]
    Unknown(String),
    #[error("parameter `{0}` is read-only: it is read once at start (set it in the parameter file)")]
    ReadOnly(String),
    #[error("parameter `{name}` is a {expected}, not a {got}")]
    WrongType { name: String, expected: &'static str, got: &'static str },
    #[error("parameter `{name}`: {value} is outside {lo}..={hi}")]
    OutOfRange { name: String, value: f64, lo: f64, hi: f64 },
    #[error("parameter `{name}`: {reason}")]
    Invalid { name: String, reason: String },
}

/// Levels of `log_level`, least verbose first.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Parameters every node has besides its own.
const USE_SIM_TIME: Doc =
    Doc::fixed("use_sim_time", "follow /clock instead of the wall clock: every timer, timeout, stamp and rate");
const LOG_LEVEL: Doc =
    Doc::live("log_level", "least severe log level shown and sent to /rosout: error, warn, info, debug or trace");

/// The node's parameters, served.
pub struct Table<P> {
    params: P,
    fields: Mapping,
    docs: &'static [Doc],
    check: fn(&P) -> Result<(), String>,
    use_sim_time: bool,
    log_level: String,
}

impl<P: Serialize + DeserializeOwned + Clone> Table<P> {
    /// `params` as loaded (already valid); `check` is the node's whole-struct validation.
    pub fn new(
        params: P,
        docs: &'static [Doc],
        check: fn(&P) -> Result<(), String>,
        use_sim_time: bool,
        log_level: &str,
    ) -> Result<Self, String> {
        let fields = fields_of(&params)?;
        Ok(Table { params, fields, docs, check, use_sim_time, log_level: log_level.to_string() })
    }

    pub fn params(&self) -> &P {
        &self.params
    }

    pub fn log_level(&self) -> &str {
        &self.log_level
    }

    /// Every parameter name, the node's own first (in declaration order).
    pub fn names(&self) -> Vec<String> {
        let own = self.fields.keys().filter_map(Yaml::as_str).map(str::to_string);
        own.chain([LOG_LEVEL.name.to_string(), USE_SIM_TIME.name.to_string()]).collect()
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        match name {
            "use_sim_time" => Some(Value::Bool(self.use_sim_time)),
            "log_level" => Some(Value::String(self.log_level.clone())),
            _ => Value::from_yaml(self.fields.get(name)?),
        }
    }

    fn doc(&self, name: &str) -> Option<Doc> {
        match name {
            "use_sim_time" => Some(USE_SIM_TIME),
            "log_level" => Some(LOG_LEVEL),
            _ => self.docs.iter().find(|d| d.name == name).copied(),
        }
    }

    pub fn describe(&self, name: &str) -> Option<Described> {
        let value = self.get(name)?;
        let doc = self.doc(name);
        Some(Described {
            name: name.to_string(),
            value,
            description: doc.map_or("", |d| d.description).to_string(),
            range: doc.and_then(|d| d.range),
            read_only: !doc.is_some_and(|d| d.live),
        })
    }

    /// Sets one parameter; on success returns whether its value changed.
    pub fn set(&mut self, name: &str, value: Value) -> Result<bool, SetError> {
        self.set_all(&[(name.to_string(), value)])
    }

    /// Sets several parameters at once: all of them, or none (the first refusal is returned).
    pub fn set_all(&mut self, changes: &[(String, Value)]) -> Result<bool, SetError> {
        let mut fields = self.fields.clone();
        let mut log_level = self.log_level.clone();
        let mut changed = false;
        for (name, value) in changes {
            let current = self.get(name).ok_or_else(|| SetError::Unknown(name.clone()))?;
            let doc = self.doc(name).filter(|d| d.live).ok_or_else(|| SetError::ReadOnly(name.clone()))?;
            // A whole number for a double is still a number (YAML writes 2 for 2.0).
            let value = match (&current, value) {
                (Value::Double(_), Value::Integer(i)) => Value::Double(*i as f64),
                (_, v) => v.clone(),
            };
            if !current.same_type(&value) {
                return Err(SetError::WrongType {
                    name: name.clone(),
                    expected: current.type_name(),
                    got: value.type_name(),
                });
            }
            if let (Some((lo, hi)), Some(x)) = (doc.range, value.as_f64()) {
                if !(x.is_finite() && lo <= x && x <= hi) {
                    return Err(SetError::OutOfRange { name: name.clone(), value: x, lo, hi });
                }
            }
            changed |= current != value;
            if name == LOG_LEVEL.name {
                let Value::String(level) = &value else { unreachable!("type checked above") };
                if !LOG_LEVELS.contains(&level.as_str()) {
                    let reason = format!("`{level}` is not one of {}", LOG_LEVELS.join(", "));
                    return Err(SetError::Invalid { name: name.clone(), reason });
                }
                log_level = level.clone();
            } else {
                fields.insert(Yaml::String(name.clone()), value.to_yaml());
            }
        }
        let invalid = |reason: String| SetError::Invalid { name: names_of(changes), reason };
        let params: P = serde_yaml::from_value(Yaml::Mapping(fields.clone())).map_err(|e| invalid(e.to_string()))?;
        (self.check)(&params).map_err(invalid)?;
        self.params = params;
        self.fields = fields;
        self.log_level = log_level;
        Ok(changed)
    }
}

fn names_of(changes: &[(String, Value)]) -> String {
    changes.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join("`, `")
}

fn fields_of<P: Serialize>(p: &P) -> Result<Mapping, String> {
    match serde_yaml::to_value(p).map_err(|e| e.to_string())? {
        Yaml::Mapping(m) => Ok(m),
        other => Err(format!("parameters must serialize to a mapping, not {other:?}")),
    }
}

/// The fields of `P` that have no [`Doc`] (a node's unit test keeps this empty).
pub fn undocumented<P: Serialize>(p: &P, docs: &[Doc]) -> Vec<String> {
    let fields = fields_of(p).unwrap_or_default();
    let names = fields.keys().filter_map(Yaml::as_str);
    names.filter(|n| !docs.iter().any(|d| d.name == *n)).map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct P {
        suspect_phi: f64,
        declare_phi: f64,
        window: usize,
        topic: String,
        periods: Vec<u32>,
        mode: Mode,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    const DOCS: &[Doc] = &[
        Doc::live_in("suspect_phi", "phi from which a UAV is suspected", 0.0, 100.0),
        Doc::live_in("declare_phi", "phi from which a UAV is declared", 0.0, 100.0),
        Doc::fixed_in("window", "samples kept", 1.0, 1e6),
        Doc::live("topic", "input topic"),
        Doc::fixed("periods", "snapshot periods"),
        Doc::live("mode", "fast or slow"),
    ];

    fn check(p: &P) -> Result<(), String> {
        if p.declare_phi > p.suspect_phi {
            Ok(())
        } else {
            Err(format!("declare_phi ({}) must exceed suspect_phi ({})", p.declare_phi, p.suspect_phi))
        }
    }

    fn table() -> Table<P> {
        let p = P {
            suspect_phi: 5.0,
            declare_phi: 8.0,
            window: 500,
            topic: "battery_state".into(),
            periods: vec![1, 2, 4],
            mode: Mode::Fast,
        };
        Table::new(p, DOCS, check, true, "info").expect("table")
    }

    #[test]
    fn lists_and_gets_every_field_with_its_type() {
        let t = table();
        assert_eq!(
            t.names(),
            ["suspect_phi", "declare_phi", "window", "topic", "periods", "mode", "log_level", "use_sim_time"]
        );
        assert_eq!(t.get("declare_phi"), Some(Value::Double(8.0)));
        assert_eq!(t.get("window"), Some(Value::Integer(500)));
        assert_eq!(t.get("periods"), Some(Value::IntegerArray(vec![1, 2, 4])));
        assert_eq!(t.get("mode"), Some(Value::String("fast".into())));
        assert_eq!(t.get("use_sim_time"), Some(Value::Bool(true)));
        assert_eq!(t.get("nope"), None);
        let d = t.describe("window").expect("described");
        assert_eq!((d.range, d.read_only, d.description.as_str()), (Some((1.0, 1e6)), true, "samples kept"));
        assert!(!t.describe("declare_phi").expect("described").read_only);
        assert!(t.describe("use_sim_time").expect("described").read_only);
        assert!(!t.describe("log_level").expect("described").read_only);
    }

    #[test]
    fn a_live_value_is_set_and_a_bad_one_refused_with_the_reason() {
        let mut t = table();
        assert_eq!(t.set("declare_phi", Value::Double(9.0)), Ok(true));
        assert_eq!(t.params().declare_phi, 9.0);
        assert_eq!(t.set("declare_phi", Value::Integer(10)), Ok(true), "a whole number for a double");
        assert_eq!(t.set("declare_phi", Value::Double(10.0)), Ok(false));
        let err = t.set("declare_phi", Value::Double(4.0)).unwrap_err();
        assert!(err.to_string().contains("must exceed suspect_phi"), "{err}");
        assert_eq!(t.params().declare_phi, 10.0, "unchanged after a refusal");
        assert!(matches!(t.set("declare_phi", Value::Double(1e9)), Err(SetError::OutOfRange { .. })));
        assert!(matches!(t.set("declare_phi", Value::Double(f64::NAN)), Err(SetError::OutOfRange { .. })));
        assert!(matches!(t.set("declare_phi", Value::String("x".into())), Err(SetError::WrongType { .. })));
        assert_eq!(t.set("window", Value::Integer(3)), Err(SetError::ReadOnly("window".into())));
        assert_eq!(t.set("use_sim_time", Value::Bool(false)), Err(SetError::ReadOnly("use_sim_time".into())));
        assert_eq!(t.set("nope", Value::Bool(false)), Err(SetError::Unknown("nope".into())));
        // An enum takes its names only.
        assert_eq!(t.set("mode", Value::String("slow".into())), Ok(true));
        assert_eq!(t.params().mode, Mode::Slow);
        let err = t.set("mode", Value::String("warp".into())).unwrap_err();
        assert!(err.to_string().contains("warp"), "{err}");
        assert_eq!(t.set("topic", Value::String("/x/battery_state".into())), Ok(true));
        assert_eq!(t.get("topic"), Some(Value::String("/x/battery_state".into())));
    }

    #[test]
    fn several_at_once_all_or_none() {
        let mut t = table();
        let both = [("suspect_phi".to_string(), Value::Double(11.0)), ("declare_phi".to_string(), Value::Double(12.0))];
        assert_eq!(t.set_all(&both), Ok(true), "each alone would be refused");
        let bad = [("declare_phi".to_string(), Value::Double(20.0)), ("window".to_string(), Value::Integer(1))];
        assert!(t.set_all(&bad).is_err());
        assert_eq!(t.params().declare_phi, 12.0);
    }

    #[test]
    fn log_level_takes_known_levels() {
        let mut t = table();
        assert_eq!(t.set("log_level", Value::String("debug".into())), Ok(true));
        assert_eq!(t.log_level(), "debug");
        assert!(matches!(t.set("log_level", Value::String("loud".into())), Err(SetError::Invalid { .. })));
        assert_eq!(t.log_level(), "debug");
    }

    #[test]
    fn undocumented_fields_are_found() {
        assert!(undocumented(table().params(), DOCS).is_empty());
        assert_eq!(undocumented(table().params(), &DOCS[1..]), ["suspect_phi"]);
    }
}
