//! The ROS 2 parameter services of a node (`~/list_parameters`, `~/get_parameters`,
//! `~/describe_parameters`, `~/get_parameter_types`, `~/set_parameters`,
//! `~/set_parameters_atomically`), served from the node's typed parameters through
//! [`crate::node_params::Table`]: `ros2 param list/get/describe/set` work on every node.
//! Accepted changes of live parameters reach the node through the returned watch channel.
use crate::node_params::{Doc, SetError, Table, Value};
use crate::ros::NodeContext;
use futures::StreamExt;
use r2r::rcl_interfaces::msg::{
    FloatingPointRange, IntegerRange, ListParametersResult, ParameterDescriptor, ParameterValue, SetParametersResult,
};
use r2r::rcl_interfaces::srv::{
    DescribeParameters, GetParameterTypes, GetParameters, ListParameters, SetParameters, SetParametersAtomically,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

/// `rcl_interfaces/msg/ParameterType`.
mod ptype {
    pub const NOT_SET: u8 = 0;
    pub const BOOL: u8 = 1;
    pub const INTEGER: u8 = 2;
    pub const DOUBLE: u8 = 3;
    pub const STRING: u8 = 4;
    pub const INTEGER_ARRAY: u8 = 7;
    pub const DOUBLE_ARRAY: u8 = 8;
    pub const STRING_ARRAY: u8 = 9;
}

fn to_msg(v: Option<&Value>) -> ParameterValue {
    let mut m = ParameterValue::default();
    match v {
        None => m.type_ = ptype::NOT_SET,
        Some(Value::Bool(b)) => (m.type_, m.bool_value) = (ptype::BOOL, *b),
        Some(Value::Integer(i)) => (m.type_, m.integer_value) = (ptype::INTEGER, *i),
        Some(Value::Double(d)) => (m.type_, m.double_value) = (ptype::DOUBLE, *d),
        Some(Value::String(s)) => (m.type_, m.string_value) = (ptype::STRING, s.clone()),
        Some(Value::IntegerArray(a)) => (m.type_, m.integer_array_value) = (ptype::INTEGER_ARRAY, a.clone()),
        Some(Value::DoubleArray(a)) => (m.type_, m.double_array_value) = (ptype::DOUBLE_ARRAY, a.clone()),
        Some(Value::StringArray(a)) => (m.type_, m.string_array_value) = (ptype::STRING_ARRAY, a.clone()),
    }
    m
}

/// A value a client sent; `Err` names a type no parameter here has.
fn from_msg(m: &ParameterValue) -> Result<Value, String> {
    Ok(match m.type_ {
        ptype::BOOL => Value::Bool(m.bool_value),
        ptype::INTEGER => Value::Integer(m.integer_value),
        ptype::DOUBLE => Value::Double(m.double_value),
        ptype::STRING => Value::String(m.string_value.clone()),
        ptype::INTEGER_ARRAY => Value::IntegerArray(m.integer_array_value.clone()),
        ptype::DOUBLE_ARRAY => Value::DoubleArray(m.double_array_value.clone()),
        ptype::STRING_ARRAY => Value::StringArray(m.string_array_value.clone()),
        ptype::NOT_SET => return Err("parameters of this node cannot be undeclared".into()),
        t => return Err(format!("parameter type {t} is not used by this node")),
    })
}

fn describe<P: Serialize + DeserializeOwned + Clone>(t: &Table<P>, name: &str) -> ParameterDescriptor {
    let Some(d) = t.describe(name) else {
        return ParameterDescriptor { name: name.into(), type_: ptype::NOT_SET, ..Default::default() };
    };
    let type_ = to_msg(Some(&d.value)).type_;
    let (mut floating_point_range, mut integer_range) = (Vec::new(), Vec::new());
    match (d.range, &d.value) {
        (Some((lo, hi)), Value::Integer(_)) => {
            integer_range.push(IntegerRange { from_value: lo as i64, to_value: hi as i64, step: 0 })
        }
        (Some((lo, hi)), Value::Double(_)) => {
            floating_point_range.push(FloatingPointRange { from_value: lo, to_value: hi, step: 0.0 })
        }
        _ => {}
    }
    let additional_constraints =
        if d.read_only { "read-only: set it in the parameter file".into() } else { String::new() };
    ParameterDescriptor {
        name: d.name,
        type_,
        description: d.description,
        additional_constraints,
        read_only: d.read_only,
        dynamic_typing: false,
        floating_point_range,
        integer_range,
    }
}

fn result(r: Result<bool, SetError>) -> SetParametersResult {
    match r {
        Ok(_) => SetParametersResult { successful: true, reason: String::new() },
        Err(e) => SetParametersResult { successful: false, reason: e.to_string() },
    }
}

/// Serves the node's parameters until the node stops. `check` is the node's validation of the
/// whole struct. The receiver sees every accepted change.
pub fn serve<P>(
    ctx: &NodeContext,
    params: P,
    docs: &'static [Doc],
    check: fn(&P) -> Result<(), String>,
) -> anyhow::Result<watch::Receiver<P>>
where
    P: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let mut table = Table::new(params.clone(), docs, check, ctx.use_sim_time, &ctx.log_level)
        .map_err(|e| anyhow::anyhow!("parameters: {e}"))?;
    let qos = r2r::QosProfile::services_default;
    let (mut list, mut get, mut describe_s, mut types, mut set, mut set_atomic) = {
        let mut node = ctx.lock();
        (
            node.create_service::<ListParameters::Service>("~/list_parameters", qos())?,
            node.create_service::<GetParameters::Service>("~/get_parameters", qos())?,
            node.create_service::<DescribeParameters::Service>("~/describe_parameters", qos())?,
            node.create_service::<GetParameterTypes::Service>("~/get_parameter_types", qos())?,
            node.create_service::<SetParameters::Service>("~/set_parameters", qos())?,
            node.create_service::<SetParametersAtomically::Service>("~/set_parameters_atomically", qos())?,
        )
    };
    let (tx, rx) = watch::channel(params);
    let shutdown = ctx.shutdown();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let log_level = table.log_level().to_string();
            let applied = tokio::select! {
                _ = &mut shutdown => break,
                Some(req) = list.next() => {
                    let prefixes = &req.message.prefixes;
                    let names = table
                        .names()
                        .into_iter()
                        .filter(|n| prefixes.is_empty() || prefixes.iter().any(|p| n == p || n.starts_with(&format!("{p}."))))
                        .collect();
                    let result = ListParametersResult { names, prefixes: Vec::new() };
                    let _ = req.respond(ListParameters::Response { result });
                    false
                }
                Some(req) = get.next() => {
                    let values = req.message.names.iter().map(|n| to_msg(table.get(n).as_ref())).collect();
                    let _ = req.respond(GetParameters::Response { values });
                    false
                }
                Some(req) = describe_s.next() => {
                    let descriptors = req.message.names.iter().map(|n| describe(&table, n)).collect();
                    let _ = req.respond(DescribeParameters::Response { descriptors });
                    false
                }
                Some(req) = types.next() => {
                    let types = req.message.names.iter().map(|n| to_msg(table.get(n).as_ref()).type_).collect();
                    let _ = req.respond(GetParameterTypes::Response { types });
                    false
                }
                Some(req) = set.next() => {
                    let mut results = Vec::new();
                    let mut any = false;
                    for p in &req.message.parameters {
                        let r = match from_msg(&p.value) {
                            Ok(v) => table.set(&p.name, v),
                            Err(reason) => Err(SetError::Invalid { name: p.name.clone(), reason }),
                        };
                        log_outcome(&p.name, &r);
                        any |= r.is_ok();
                        results.push(result(r));
                    }
                    let _ = req.respond(SetParameters::Response { results });
                    any
                }
                Some(req) = set_atomic.next() => {
                    let changes: Result<Vec<(String, Value)>, SetError> = req
                        .message
                        .parameters
                        .iter()
                        .map(|p| from_msg(&p.value).map(|v| (p.name.clone(), v)).map_err(|reason| SetError::Invalid { name: p.name.clone(), reason }))
                        .collect();
                    let r = changes.and_then(|c| table.set_all(&c));
                    let names: Vec<&str> = req.message.parameters.iter().map(|p| p.name.as_str()).collect();
                    log_outcome(&names.join(", "), &r);
                    let ok = r.is_ok();
                    let _ = req.respond(SetParametersAtomically::Response { result: result(r) });
                    ok
                }
            };
            if applied {
                if table.log_level() != log_level {
                    if let Err(e) = crate::ros::rosout::set_level(table.log_level()) {
                        tracing::warn!("log level not applied: {e}");
                    }
                }
                tx.send_replace(table.params().clone());
            }
        }
    });
    Ok(rx)
}

fn log_outcome(name: &str, r: &Result<bool, SetError>) {
    match r {
        Ok(true) => tracing::info!(parameter = name, "parameter changed"),
        Ok(false) => {}
        Err(e) => tracing::warn!(parameter = name, "parameter change refused: {e}"),
    }
}
