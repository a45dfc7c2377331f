//! Messages <-> the pure types. Payloads are raw little-endian f32 (`codec = "raw"`); the codec
//! field lets f16/int8 encodings be added without changing the interfaces.
use crate::control::{BatteryHealthFields, HeartbeatFields};
use crate::dataplane::{Stage, SwarmPlan};
use aerokv_engine::{Hidden, KvRows, LayerRows};
use r2r::aerokv::msg::{Activation, Assignment, BatteryHealth, Heartbeat, KvSnapshot, UavAssignment};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("unsupported codec {codec:?} / dtype {dtype:?} (this build decodes raw f32)")]
    Codec { codec: String, dtype: String },
    #[error("payload of {bytes} bytes does not match shape {shape:?}")]
    Shape { bytes: usize, shape: Vec<u32> },
    #[error(transparent)]
    Engine(#[from] aerokv_engine::EngineError),
}

fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn bytes_to_f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn check_codec(codec: &str, dtype: &str) -> Result<(), ConvertError> {
    if codec == "raw" && dtype == "f32" {
        Ok(())
    } else {
        Err(ConvertError::Codec { codec: codec.into(), dtype: dtype.into() })
    }
}

#[allow(clippy::too_many_arguments)]
pub fn activation(
    epoch: u64,
    request_id: u64,
    step: u32,
    position: usize,
    boundary: usize,
    source: &str,
    h: &Hidden,
) -> Activation {
    Activation {
        epoch,
        request_id,
        step,
        position: position as u32,
        token_count: h.tokens() as u32,
        layer_boundary: boundary as u32,
        source: source.into(),
        shape: vec![1, h.tokens() as u32, h.width() as u32],
        dtype: "f32".into(),
        codec: "raw".into(),
        payload: f32s_to_bytes(h.as_slice()),
        chunk_tokens: Vec::new(),
        stamp: crate::ros::now_stamp(),
    }
}

/// Several chunks (in position order) as one message; `chunk_tokens` keeps their sizes.
pub fn packed_activation(
    epoch: u64,
    request_id: u64,
    boundary: usize,
    source: &str,
    chunks: &[(usize, Hidden)],
) -> Result<Activation, ConvertError> {
    let width = chunks.first().map_or(1, |(_, h)| h.width());
    let mut data = Vec::with_capacity(chunks.iter().map(|(_, h)| h.as_slice().len()).sum());
    for (_, h) in chunks {
        data.extend_from_slice(h.as_slice());
    }
    let position = chunks.first().map_or(0, |(p, _)| *p);
    let mut msg = activation(epoch, request_id, 0, position, boundary, source, &Hidden::new(data, width)?);
    msg.chunk_tokens = chunks.iter().map(|(_, h)| h.tokens() as u32).collect();
    Ok(msg)
}

/// The chunks of a packed message, with their positions (consecutive from `position`).
pub fn unpack(a: &Activation) -> Result<Vec<(usize, Hidden)>, ConvertError> {
    let all = hidden(a)?;
    if a.chunk_tokens.is_empty() {
        return Ok(vec![(a.position as usize, all)]);
    }
    if a.chunk_tokens.iter().map(|&t| t as usize).sum::<usize>() != all.tokens() {
        return Err(ConvertError::Shape { bytes: a.payload.len(), shape: a.chunk_tokens.clone() });
    }
    let mut out = Vec::with_capacity(a.chunk_tokens.len());
    let (mut row, mut position) = (0, a.position as usize);
    for &t in &a.chunk_tokens {
        out.push((position, all.rows(row..row + t as usize)?));
        row += t as usize;
        position += t as usize;
    }
    Ok(out)
}

pub fn hidden(a: &Activation) -> Result<Hidden, ConvertError> {
    check_codec(&a.codec, &a.dtype)?;
    let width = *a.shape.last().unwrap_or(&0) as usize;
    let expected = a.shape.iter().map(|&d| d as usize).product::<usize>() * 4;
    if a.shape.len() != 3 || expected != a.payload.len() || a.shape[1] != a.token_count {
        return Err(ConvertError::Shape { bytes: a.payload.len(), shape: a.shape.clone() });
    }
    Ok(Hidden::new(bytes_to_f32s(&a.payload), width)?)
}

pub fn kv_snapshot(epoch: u64, request_id: u64, source: &str, holder: &str, rows: &KvRows) -> KvSnapshot {
    let mut payload = Vec::with_capacity(rows.byte_len());
    for l in &rows.layers {
        payload.extend(f32s_to_bytes(&l.key));
        payload.extend(f32s_to_bytes(&l.value));
    }
    // Layers are contiguous in pipeline order; past the last layer the range wraps (mod L).
    let lo = rows.layers.first().map_or(0, |l| l.layer as u32);
    let hi = lo + rows.layers.len() as u32;
    KvSnapshot {
        epoch,
        request_id,
        source: source.into(),
        holder: holder.into(),
        layer_start: lo,
        layer_end: hi,
        token_start: rows.token_start as u32,
        token_end: (rows.token_start + rows.tokens) as u32,
        kv_heads: rows.kv_heads as u32,
        head_dim: rows.head_dim as u32,
        dtype: "f32".into(),
        codec: "raw".into(),
        payload,
        stamp: crate::ros::now_stamp(),
    }
}

/// The layers of a snapshot are `[layer_start, layer_end)` modulo `num_layers`, each K then V.
pub fn kv_rows(m: &KvSnapshot, num_layers: usize) -> Result<KvRows, ConvertError> {
    check_codec(&m.codec, &m.dtype)?;
    let tokens = m.token_end.saturating_sub(m.token_start) as usize;
    let per = m.kv_heads as usize * tokens * m.head_dim as usize;
    let layers = m.layer_end.saturating_sub(m.layer_start) as usize;
    if m.payload.len() != layers * 2 * per * 4 {
        return Err(ConvertError::Shape {
            bytes: m.payload.len(),
            shape: vec![m.layer_start, m.layer_end, m.token_start, m.token_end],
        });
    }
    let all = bytes_to_f32s(&m.payload);
    let rows = (0..layers)
        .map(|i| LayerRows {
            layer: (m.layer_start as usize + i) % num_layers.max(1),
            key: all[2 * i * per..(2 * i + 1) * per].to_vec(),
            value: all[(2 * i + 1) * per..(2 * i + 2) * per].to_vec(),
        })
        .collect();
    Ok(KvRows {
        token_start: m.token_start as usize,
        tokens,
        kv_heads: m.kv_heads as usize,
        head_dim: m.head_dim as usize,
        layers: rows,
    })
}

pub fn plan(a: &Assignment) -> SwarmPlan {
    SwarmPlan {
        epoch: a.epoch,
        num_layers: a.num_layers as usize,
        stages: a
            .uavs
            .iter()
            .map(|u| Stage {
                uav: u.uav_id.clone(),
                start: u.layer_start as usize,
                len: u.layer_end.saturating_sub(u.layer_start) as usize,
                k: u.overlap_layers as usize,
                t: u.snapshot_period as usize,
            })
            .collect(),
        request_id: a.request_id,
        resume_position: a.resume_position as usize,
        replay_from: a.replay_from as usize,
    }
}

/// Stage intervals that wrap around the gateway are sent as `layer_end > num_layers`.
pub fn assignment(plan: &SwarmPlan, variant: &str, reason: &str) -> Assignment {
    Assignment {
        epoch: plan.epoch,
        stamp: crate::ros::now_stamp(),
        model_variant: variant.into(),
        num_layers: plan.num_layers as u32,
        ring: plan.stages.iter().map(|s| s.uav.clone()).collect(),
        uavs: plan
            .stages
            .iter()
            .map(|s| UavAssignment {
                uav_id: s.uav.clone(),
                layer_start: s.start as u32,
                layer_end: (s.start + s.len) as u32,
                overlap_layers: s.k as u32,
                snapshot_period: s.t as u32,
            })
            .collect(),
        reason: reason.into(),
        request_id: plan.request_id,
        resume_position: plan.resume_position as u32,
        replay_from: plan.replay_from as u32,
        auth: Default::default(), // signed by the publisher (crate::ros::auth)
    }
}

/// The figures of a battery health report that [`crate::control::validate_battery_health`] checks.
pub fn battery_health_fields(m: &BatteryHealth) -> BatteryHealthFields<'_> {
    BatteryHealthFields {
        uav_id: &m.uav_id,
        energy_j: m.energy_j,
        capacity_j: m.capacity_j,
        state_of_charge: m.state_of_charge,
        power_w: m.power_w,
        expected_remaining_tokens: m.expected_remaining_tokens,
    }
}

/// The figures of a heartbeat that [`crate::control::validate_heartbeat`] checks.
pub fn heartbeat_fields(m: &Heartbeat) -> HeartbeatFields<'_> {
    HeartbeatFields {
        uav_id: &m.uav_id,
        layer_start: m.layer_start,
        layer_end: m.layer_end,
        replica_start: m.replica_start,
        replica_end: m.replica_end,
        compute_ms_per_layer: m.compute_ms_per_layer,
        compute_s_total: m.compute_s_total,
    }
}
