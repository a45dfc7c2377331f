//! Messages <-> the pure types. Activation payloads are encoded with the swarm's activation
//! codec (raw f32, f16, int8; `aerokv_codec`), KV rows with the sender's lossless KV codec (raw,
//! zstd); `codec` names it, `dtype` is always "f32" (what the payload decodes to). Everything a
//! message declares is checked before anything is allocated from it.
use crate::control::{BatteryHealthFields, HeartbeatFields};
use crate::dataplane::{RequestResume, Stage, SwarmPlan};
use aerokv_codec::{check_dtype, ActivationCodec, CodecError, Encoded, KvCodec, DTYPE};
use aerokv_engine::{Architecture, Hidden, KvRows, LayerRows};
use r2r::aerokv::msg::{Activation, Assignment, BatteryHealth, Heartbeat, KvSnapshot, UavAssignment};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("payload of {bytes} bytes does not match shape {shape:?}")]
    Shape { bytes: usize, shape: Vec<u32> },
    #[error("KV rows {what}")]
    KvShape { what: String },
    #[error(transparent)]
    Engine(#[from] aerokv_engine::EngineError),
    #[error("context_tokens {tokens} is past the model's context of {limit} tokens")]
    ContextTokens { tokens: u32, limit: usize },
}

#[allow(clippy::too_many_arguments)]
pub fn activation(
    epoch: u64,
    request_id: u64,
    step: u32,
    position: usize,
    boundary: usize,
    source: &str,
    h: &Encoded,
) -> Activation {
    Activation {
        epoch,
        request_id,
        step,
        position: position as u32,
        token_count: h.rows() as u32,
        layer_boundary: boundary as u32,
        source: source.into(),
        shape: vec![1, h.rows() as u32, h.width() as u32],
        dtype: DTYPE.into(),
        codec: h.codec().name().into(),
        payload: h.bytes().to_vec(),
        chunk_tokens: Vec::new(),
        stamp: crate::ros::now_stamp(),
        // Set by the sender when it knows the request's length (0 = unknown).
        context_tokens: 0,
        auth: Default::default(),
    }
}

/// Several chunks (in position order) as one message; `chunk_tokens` keeps their sizes.
pub fn packed_activation(
    epoch: u64,
    request_id: u64,
    boundary: usize,
    source: &str,
    chunks: &[(usize, Encoded)],
) -> Result<Activation, ConvertError> {
    let all = Encoded::concat(chunks.iter().map(|(_, h)| h))?;
    let position = chunks.first().map_or(0, |(p, _)| *p);
    let mut msg = activation(epoch, request_id, 0, position, boundary, source, &all);
    msg.chunk_tokens = chunks.iter().map(|(_, h)| h.rows() as u32).collect();
    Ok(msg)
}

/// The chunks of a packed message, with their positions (consecutive from `position`).
pub fn unpack(a: &Activation) -> Result<Vec<(usize, Encoded)>, ConvertError> {
    let all = encoded(a)?;
    if a.chunk_tokens.is_empty() {
        return Ok(vec![(a.position as usize, all)]);
    }
    let rows: Vec<usize> = a.chunk_tokens.iter().map(|&t| t as usize).collect();
    let mut position = a.position as usize;
    let mut out = Vec::with_capacity(rows.len());
    for chunk in all.split(&rows)? {
        let rows = chunk.rows();
        out.push((position, chunk));
        position += rows;
    }
    Ok(out)
}

/// The payload of an activation, checked against its declared codec, dtype and shape.
pub fn encoded(a: &Activation) -> Result<Encoded, ConvertError> {
    check_dtype(&a.dtype)?;
    let codec: ActivationCodec = a.codec.parse()?;
    if a.shape.len() != 3 || a.shape[0] != 1 || a.shape[1] != a.token_count {
        return Err(ConvertError::Shape { bytes: a.payload.len(), shape: a.shape.clone() });
    }
    Ok(Encoded::from_wire(codec, a.shape[1] as usize, a.shape[2] as usize, a.payload.clone())?)
}

/// The KV capacity an activation asks for its request (`context_tokens`): 0 (unknown: the
/// model's context) or 1 ..= the model's `max_context`; more is refused (the message is dropped)
/// before a cache of that size is allocated.
pub fn context_tokens(a: &Activation, arch: &Architecture) -> Result<usize, ConvertError> {
    if a.context_tokens as usize > arch.max_context {
        return Err(ConvertError::ContextTokens { tokens: a.context_tokens, limit: arch.max_context });
    }
    Ok(a.context_tokens as usize)
}

/// The hidden states an activation carries, decoded.
pub fn hidden(a: &Activation) -> Result<Hidden, ConvertError> {
    let e = encoded(a)?;
    Ok(Hidden::new(e.decode()?, e.width())?)
}

pub fn kv_snapshot(
    epoch: u64,
    request_id: u64,
    source: &str,
    holder: &str,
    rows: &KvRows,
    codec: KvCodec,
) -> Result<KvSnapshot, ConvertError> {
    let mut all = Vec::with_capacity(rows.byte_len() / 4);
    for l in &rows.layers {
        all.extend_from_slice(&l.key);
        all.extend_from_slice(&l.value);
    }
    // Layers are contiguous in pipeline order; past the last layer the range wraps (mod L).
    let lo = rows.layers.first().map_or(0, |l| l.layer as u32);
    let hi = lo + rows.layers.len() as u32;
    Ok(KvSnapshot {
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
        dtype: DTYPE.into(),
        codec: codec.name().into(),
        payload: codec.encode(&all)?,
        stamp: crate::ros::now_stamp(),
        auth: Default::default(),
    })
}

/// The layers of a snapshot are `[layer_start, layer_end)` modulo the model's layer count, each K
/// then V. Its shape must be the model's (`arch`): the size it declares, and so what decoding may
/// allocate, is at most the KV of every layer at the longest context.
pub fn kv_rows(m: &KvSnapshot, arch: &Architecture) -> Result<KvRows, ConvertError> {
    check_dtype(&m.dtype)?;
    let codec: KvCodec = m.codec.parse()?;
    let layers = m.layer_end.saturating_sub(m.layer_start) as usize;
    let (start, end) = (m.token_start as usize, m.token_end as usize);
    let bad = |what: String| Err(ConvertError::KvShape { what });
    if m.kv_heads as usize != arch.kv_heads || m.head_dim as usize != arch.head_dim {
        return bad(format!(
            "of {} heads x {}, the model has {} x {}",
            m.kv_heads, m.head_dim, arch.kv_heads, arch.head_dim
        ));
    }
    if layers == 0 || layers > arch.layers || m.layer_start as usize >= arch.layers {
        return bad(format!("of layers [{}, {}) in a model of {}", m.layer_start, m.layer_end, arch.layers));
    }
    if start >= end || end > arch.max_context {
        return bad(format!("of tokens [{start}, {end}) (context {})", arch.max_context));
    }
    let tokens = end - start;
    let per = arch.kv_heads * tokens * arch.head_dim;
    let all = codec.decode(&m.payload, layers * 2 * per)?;
    let rows = (0..layers)
        .map(|i| LayerRows {
            layer: (m.layer_start as usize + i) % arch.layers,
            key: all[2 * i * per..(2 * i + 1) * per].to_vec(),
            value: all[(2 * i + 1) * per..(2 * i + 2) * per].to_vec(),
        })
        .collect();
    Ok(KvRows { token_start: start, tokens, kv_heads: arch.kv_heads, head_dim: arch.head_dim, layers: rows })
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
        requests: a
            .requests
            .iter()
            .map(|r| RequestResume {
                request_id: r.request_id,
                resume_position: r.resume_position as usize,
                replay_from: r.replay_from as usize,
            })
            .collect(),
    }
}

/// The swarm's activation codec an assignment names (empty: raw, as before the field existed).
pub fn assignment_codec(a: &Assignment) -> Result<ActivationCodec, ConvertError> {
    if a.activation_codec.is_empty() {
        Ok(ActivationCodec::Raw)
    } else {
        Ok(a.activation_codec.parse()?)
    }
}

/// Stage intervals that wrap around the gateway are sent as `layer_end > num_layers`.
pub fn assignment(plan: &SwarmPlan, variant: &str, reason: &str, codec: ActivationCodec) -> Assignment {
    Assignment {
        activation_codec: codec.name().into(),
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
        requests: plan
            .requests
            .iter()
            .map(|r| r2r::aerokv::msg::RequestResume {
                request_id: r.request_id,
                resume_position: r.resume_position as u32,
                replay_from: r.replay_from as u32,
            })
            .collect(),
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
        link_goodput_bps: m.link_goodput_bps,
        link_phy_bps: m.link_phy_bps,
        memory_bytes: m.memory_bytes,
        weight_bytes: m.weight_bytes,
        kv: m
            .kv
            .iter()
            .map(|k| crate::control::KvHeld {
                request_id: k.request_id,
                kv_tokens: k.kv_tokens,
                kv_bytes: k.kv_bytes,
                pred_snapshot_tokens: k.pred_snapshot_tokens,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(max_context: usize) -> Architecture {
        Architecture {
            layers: 2,
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            intermediate: 16,
            vocab: 32,
            rope_base: 10_000.0,
            rms_eps: 1e-6,
            max_context,
        }
    }

    #[test]
    fn context_tokens_is_zero_or_at_most_the_models_context() {
        let a = |tokens| Activation { context_tokens: tokens, ..Default::default() };
        let m = arch(8192);
        assert_eq!(context_tokens(&a(0), &m).unwrap(), 0, "unknown: the model's context");
        assert_eq!(context_tokens(&a(1), &m).unwrap(), 1);
        assert_eq!(context_tokens(&a(72), &m).unwrap(), 72);
        assert_eq!(context_tokens(&a(8192), &m).unwrap(), 8192);
        for tokens in [8193, u32::MAX] {
            let e = context_tokens(&a(tokens), &m).unwrap_err();
            assert!(matches!(e, ConvertError::ContextTokens { tokens: t, limit: 8192 } if t == tokens), "{e}");
            assert!(e.to_string().contains("8192"), "{e}");
        }
    }
}
