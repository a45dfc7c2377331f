//! Fast tests on the `tiny` variant (random weights, same graph structure, 4 layers).
mod common;

use std::path::Path;

use aerokv_engine::{EngineError, GenerateOptions, Hidden, KvRows, Manifest, Model, Sampling, Shard};
use common::*;

const PROMPT: &str = "Where do drones fly?";

fn copy_variant(to: &Path) -> Manifest {
    let m = manifest("tiny");
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&m.dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    Manifest::load(to).unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aerokv-engine-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn manifest_tiles_the_layers() {
    let m = manifest("tiny");
    let layers = m.architecture.layers;
    assert!(layers >= 2);
    assert_eq!(m.layer_boundaries().first(), Some(&0));
    assert_eq!(m.layer_boundaries().last(), Some(&layers));
    m.verify_files().unwrap();
}

#[test]
fn any_split_gives_bit_identical_hidden_states_and_tokens() {
    let rt = runtime();
    let m = manifest("tiny");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    let layers = m.architecture.layers;
    let mut whole = shards(&rt, &m, &[layers]);
    let reference = run_pipeline(&mut gw, &mut whole, &prompt, 8);
    for split in [vec![1, layers - 1], vec![layers - 1, 1], vec![1; layers], vec![2, layers - 2]] {
        let mut parts = shards(&rt, &m, &split);
        let trace = run_pipeline(&mut gw, &mut parts, &prompt, 8);
        assert_eq!(trace.tokens, reference.tokens, "split {split:?}");
        assert_bit_identical(&final_hidden(&trace), &final_hidden(&reference), &format!("split {split:?}"));
    }
}

#[test]
fn snapshot_import_and_replay_continue_identically() {
    let rt = runtime();
    let m = manifest("tiny");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    let layers = m.architecture.layers;
    let mut stages = shards(&rt, &m, &[1, layers - 1]);
    // Boundary snapshot of the tail after chunk 3 (prompt + 3 tokens), as the drone would send it.
    let snap_chunk = 3;
    let mut snapshot = None;
    let trace = run_pipeline_with(&mut gw, &mut stages, &prompt, 10, |chunk, stages| {
        if chunk == snap_chunk {
            snapshot = Some(stages[1].export_kv(1..layers, 0..stages[1].kv_len()).unwrap());
        }
    });
    let snapshot = snapshot.unwrap();
    let snap_len = trace.positions[snap_chunk + 1];
    assert_eq!(snapshot.tokens, snap_len);
    let tail_kv_end = stages[1].export_kv(1..layers, 0..stages[1].kv_len()).unwrap();

    // Recovery: a fresh tail restores the snapshot and replays the buffered inputs one chunk at a time.
    let mut recovered = Shard::load(&rt, &m, 1..layers).unwrap();
    recovered.import_kv(&snapshot).unwrap();
    assert_eq!(recovered.kv_len(), snap_len);
    for chunk in snap_chunk + 1..trace.stage_io.len() {
        let (input, output) = &trace.stage_io[chunk][1];
        let out = recovered.forward(input, trace.positions[chunk]).unwrap();
        assert!(out.bit_identical(output), "replayed chunk {chunk} differs");
    }
    assert_eq!(recovered.export_kv(1..layers, 0..recovered.kv_len()).unwrap(), tail_kv_end);
}

#[test]
fn kv_rows_append_and_truncate() {
    let rt = runtime();
    let m = manifest("tiny");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    let layers = m.architecture.layers;
    let mut stages = shards(&rt, &m, &[layers]);
    run_pipeline(&mut gw, &mut stages, &prompt, 4);
    let shard = &mut stages[0];
    let n = shard.kv_len();
    assert_eq!(n, prompt.len() + 4);
    let mut first = shard.export_kv(0..layers, 0..3).unwrap();
    let second = shard.export_kv(0..layers, 3..n).unwrap();
    first.append(&second).unwrap();
    assert_eq!(first, shard.export_kv(0..layers, 0..n).unwrap());
    assert_eq!(first.byte_len() as u64, shard.memory_bytes().kv_bytes);
    shard.truncate(3).unwrap();
    assert_eq!(shard.kv_len(), 3);
    assert_eq!(shard.export_kv(0..layers, 0..3).unwrap(), first_rows(&first, 3));
    // Rows that do not start where the shard ends are refused, and nothing changes.
    let err = shard.import_kv(&first).unwrap_err();
    assert!(matches!(err, EngineError::KvMismatch(_)), "{err}");
    assert_eq!(shard.kv_len(), 3);
    // The rows that follow do fit, and restore the exact cache.
    shard.import_kv(&second).unwrap();
    assert_eq!(shard.export_kv(0..layers, 0..n).unwrap(), first);
    shard.truncate(0).unwrap();
    assert_eq!(shard.kv_len(), 0);
}

fn first_rows(rows: &KvRows, n: usize) -> KvRows {
    let (h, d, total) = (rows.kv_heads, rows.head_dim, rows.tokens);
    let cut = |v: &Vec<f32>| (0..h).flat_map(|head| v[head * total * d..head * total * d + n * d].to_vec()).collect();
    KvRows {
        tokens: n,
        layers: rows
            .layers
            .iter()
            .map(|l| aerokv_engine::LayerRows { layer: l.layer, key: cut(&l.key), value: cut(&l.value) })
            .collect(),
        ..rows.clone()
    }
}

#[test]
fn model_generate_streams_the_same_text_and_is_deterministic() {
    let rt = runtime();
    let mut model = Model::load(&rt, manifest("tiny").dir).unwrap();
    let opts = GenerateOptions { max_tokens: 12, ..Default::default() };
    let mut streamed = String::new();
    let mut count = 0;
    let g = model
        .generate(PROMPT, &opts, |e| {
            streamed.push_str(e.text);
            count += 1;
        })
        .unwrap();
    assert_eq!(streamed, g.text);
    assert_eq!(g.text, model.gateway.decode(&g.tokens).unwrap());
    assert!(count >= g.tokens.len());
    assert_eq!(model.generate(PROMPT, &opts, |_| {}).unwrap().tokens, g.tokens);
    let sampled = GenerateOptions {
        max_tokens: 12,
        sampling: Sampling::TopP { temperature: 1.0, top_p: 0.9, seed: 42 },
        ..Default::default()
    };
    let a = model.generate(PROMPT, &sampled, |_| {}).unwrap();
    let b = model.generate(PROMPT, &sampled, |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn too_long_prompt_is_refused_with_the_limit() {
    let rt = runtime();
    let mut model = Model::load(&rt, manifest("tiny").dir).unwrap();
    let limit = model.manifest.architecture.max_context;
    let err = model.generate_ids(vec![100; limit + 5], &GenerateOptions::default(), |_| {}).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    // forward past the limit is refused too
    let width = model.manifest.architecture.hidden;
    let h = Hidden::new(vec![0.0; width * 2], width).unwrap();
    let mut shard = Shard::load(&rt, &model.manifest, 0..1).unwrap();
    let (heads, dim) = (model.manifest.architecture.kv_heads, model.manifest.architecture.head_dim);
    let zeros = vec![0.0; heads * (limit - 1) * dim];
    let rows = KvRows {
        token_start: 0,
        tokens: limit - 1,
        kv_heads: heads,
        head_dim: dim,
        layers: vec![aerokv_engine::LayerRows { layer: 0, key: zeros.clone(), value: zeros }],
    };
    shard.import_kv(&rows).unwrap();
    let err = shard.forward(&h, limit - 1).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let rt = runtime();
    let m = manifest("tiny");
    let layers = m.architecture.layers;
    let mut shard = Shard::load(&rt, &m, 0..layers).unwrap();
    let width = m.architecture.hidden;
    // wrong width, wrong position
    let err = shard.forward(&Hidden::new(vec![0.0; width + 1], width + 1).unwrap(), 0).unwrap_err();
    assert!(matches!(err, EngineError::InvalidInput(_)), "{err}");
    let err = shard.forward(&Hidden::new(vec![0.0; width], width).unwrap(), 5).unwrap_err();
    assert!(matches!(err, EngineError::InvalidInput(_)), "{err}");
    assert!(Hidden::new(vec![0.0; width + 1], width).is_err());
    // out of range intervals
    for (s, e) in [(0, layers + 1), (2, 2), (3, 1)] {
        let err = Shard::load(&rt, &m, s..e).unwrap_err();
        assert!(matches!(err, EngineError::IntervalOutOfRange { .. }), "{err}");
    }
    // token ids outside the vocabulary
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    assert!(matches!(gw.embed(&[u32::MAX]).unwrap_err(), EngineError::InvalidInput(_)));
    assert!(matches!(gw.embed(&[]).unwrap_err(), EngineError::InvalidInput(_)));
    // export outside the shard
    assert!(shard.export_kv(0..layers + 1, 0..0).is_err());
    assert!(shard.export_kv(0..1, 0..1).is_err());
}

#[test]
fn misaligned_interval_names_the_files() {
    // A manifest whose layers come in groups of two: only even boundaries are loadable.
    let m = manifest("tiny");
    let layers = m.architecture.layers;
    assert!(layers.is_multiple_of(2));
    let dir = temp_dir("grouped");
    std::fs::create_dir_all(&dir).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.dir.join("manifest.json")).unwrap()).unwrap();
    let files = json["files"].as_array().unwrap().clone();
    let mut grouped: Vec<serde_json::Value> = files.iter().filter(|f| f["kind"] != "layers").cloned().collect();
    for start in (0..layers).step_by(2) {
        grouped.push(serde_json::json!({"name": format!("layers_{start:03}_{:03}.onnx", start + 2), "kind": "layers",
            "start": start, "end": start + 2, "bytes": 1, "sha256": "00"}));
    }
    json["files"] = serde_json::Value::Array(grouped);
    std::fs::write(dir.join("manifest.json"), json.to_string()).unwrap();
    let grouped = Manifest::load(&dir).unwrap();
    let rt = runtime();
    let err = Shard::load(&rt, &grouped, 1..layers).unwrap_err();
    assert!(matches!(err, EngineError::MisalignedInterval { .. }), "{err}");
    assert!(err.to_string().contains("layers_000_002.onnx"), "{err}");
    let err = Shard::load(&rt, &grouped, 0..3).unwrap_err();
    assert!(err.to_string().contains("layers_002_004.onnx"), "{err}");
    // Aligned intervals pass the check and then hit the (absent) files: missing, with the fix.
    let err = Shard::load(&rt, &grouped, 0..2).unwrap_err();
    assert!(matches!(err, EngineError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("make setup"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_and_corrupt_parts_name_the_file_and_the_fix() {
    let rt = runtime();
    let dir = temp_dir("broken");
    let m = copy_variant(&dir);
    let victim = dir.join(&m.layer_files[1].name);

    std::fs::remove_file(&victim).unwrap();
    let err = Shard::load(&rt, &m, 0..m.architecture.layers).unwrap_err();
    assert!(matches!(err, EngineError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains(&m.layer_files[1].name) && err.to_string().contains("make setup"), "{err}");

    // Same size, garbage content: ONNX Runtime refuses it, and the sha256 check catches it.
    std::fs::write(&victim, vec![0x5au8; m.layer_files[1].bytes as usize]).unwrap();
    let err = Shard::load(&rt, &m, 0..m.architecture.layers).unwrap_err();
    assert!(matches!(err, EngineError::CorruptFile { .. }), "{err}");
    assert!(err.to_string().contains(&m.layer_files[1].name) && err.to_string().contains("make setup"), "{err}");
    let err = m.verify_files().unwrap_err();
    assert!(matches!(err, EngineError::CorruptFile { .. }) && err.to_string().contains("sha256"), "{err}");

    // Wrong size.
    std::fs::write(&victim, b"short").unwrap();
    let err = Shard::load(&rt, &m, 0..m.architecture.layers).unwrap_err();
    assert!(matches!(err, EngineError::CorruptFile { .. }), "{err}");

    // Corrupt manifest: not JSON, then a gap in the layers.
    let manifest_path = dir.join("manifest.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(&manifest_path, "{ not json").unwrap();
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, EngineError::InvalidManifest { .. }) && err.to_string().contains("make setup"), "{err}");
    let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
    let files = json["files"].as_array_mut().unwrap();
    let idx = files.iter().position(|f| f["kind"] == "layers" && f["start"] == 1).unwrap();
    files.remove(idx);
    std::fs::write(&manifest_path, json.to_string()).unwrap();
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, EngineError::InvalidManifest { .. }), "{err}");
    std::fs::remove_file(&manifest_path).unwrap();
    let err = Manifest::load(&dir).unwrap_err();
    assert!(matches!(err, EngineError::MissingFile { .. }) && err.to_string().contains("manifest.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn in_place_cache_capacity_truncate_and_regrow_keep_the_bits() {
    let rt = runtime();
    let m = manifest("tiny");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    let layers = m.architecture.layers;
    let steps = 10;
    let mut roomy = shards(&rt, &m, &[layers]);
    assert_eq!(roomy[0].kv_capacity(), m.architecture.max_context);
    let reference = run_pipeline(&mut gw, &mut roomy, &prompt, steps);
    let end = roomy[0].kv_len();

    // A cache with exactly the room the request needs computes the same bits.
    let mut tight = shards(&rt, &m, &[layers]);
    tight[0].set_kv_capacity(end).unwrap();
    let trace = run_pipeline(&mut gw, &mut tight, &prompt, steps);
    assert_eq!(trace.tokens, reference.tokens);
    assert_bit_identical(&final_hidden(&trace), &final_hidden(&reference), "tight capacity");
    let full = roomy[0].export_kv(0..layers, 0..end).unwrap();
    assert_eq!(tight[0].export_kv(0..layers, 0..end).unwrap(), full);
    let per_token_layer = m.architecture.kv_bytes_per_token_per_layer();
    assert_eq!(tight[0].memory_bytes().kv_reserved_bytes, (layers * end) as u64 * per_token_layer);
    // ... and refuses a step past its room, naming the capacity.
    let width = m.architecture.hidden;
    let err = tight[0].forward(&Hidden::new(vec![0.1; width], width).unwrap(), end).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { limit, .. } if limit == end), "{err}");
    assert_eq!(tight[0].kv_len(), end);

    // Truncation only moves the length: the replayed chunks overwrite the dropped rows in place
    // and give the original outputs and rows again.
    let cut_chunk = 4;
    let cut = reference.positions[cut_chunk];
    tight[0].truncate(cut).unwrap();
    assert_eq!(tight[0].kv_len(), cut);
    // Rows written after the cut and dropped again must not leak into the replay.
    let other = Hidden::new(vec![0.25; 3 * width], width).unwrap();
    tight[0].forward(&other, cut).unwrap();
    tight[0].truncate(cut).unwrap();
    for chunk in cut_chunk..reference.stage_io.len() {
        let (input, output) = &reference.stage_io[chunk][0];
        let out = tight[0].forward(input, reference.positions[chunk]).unwrap();
        assert!(out.bit_identical(output), "chunk {chunk} after truncation differs");
    }
    assert_eq!(tight[0].export_kv(0..layers, 0..end).unwrap(), full);

    // Growing keeps the rows; shrinking below them is refused and changes nothing.
    let err = tight[0].set_kv_capacity(end - 1).unwrap_err();
    assert!(matches!(err, EngineError::KvMismatch(_)), "{err}");
    tight[0].set_kv_capacity(end + 8).unwrap();
    assert_eq!(tight[0].export_kv(0..layers, 0..end).unwrap(), full);
    assert!(tight[0].set_kv_capacity(m.architecture.max_context + 1).is_err());
    let next = gw.embed(&[reference.tokens[steps]]).unwrap();
    let a = tight[0].forward(&next, end).unwrap();
    let b = roomy[0].forward(&next, end).unwrap();
    assert!(a.bit_identical(&b), "a step after growing the cache differs");
}

#[test]
fn requests_interleaved_on_one_shard_each_give_their_answer_alone() {
    let rt = runtime();
    let m = manifest("tiny");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let layers = m.architecture.layers;
    let prompts = [gw.encode_chat(PROMPT).unwrap(), gw.encode_chat("Name three uses of a swarm.").unwrap()];
    let mut solo = [shards(&rt, &m, &[layers]), shards(&rt, &m, &[layers])];
    let alone: Vec<_> = prompts.iter().zip(&mut solo).map(|(p, s)| run_pipeline(&mut gw, s, p, 6)).collect();
    // One shard, two requests (ids 7 and 9), their steps alternating: prefill 7, prefill 9, a
    // token of 7, a token of 9, ...
    let mut shard = shards(&rt, &m, &[layers]).remove(0);
    let mut sampler = aerokv_engine::Sampler::new(Sampling::Greedy);
    let ids = [7u64, 9];
    let mut chunks: Vec<Vec<u32>> = prompts.to_vec();
    let mut positions = [0usize; 2];
    let mut tokens = [Vec::new(), Vec::new()];
    let mut hidden: [Vec<Hidden>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..=6 {
        for r in 0..2 {
            shard.switch_request(ids[r]).unwrap();
            assert_eq!((shard.request(), shard.kv_len()), (ids[r], positions[r]));
            let h = shard.forward(&gw.embed(&chunks[r]).unwrap(), positions[r]).unwrap();
            let next = sampler.sample(&gw.logits(&h).unwrap()).unwrap();
            positions[r] += chunks[r].len();
            chunks[r] = vec![next];
            tokens[r].push(next);
            hidden[r].push(h);
        }
    }
    for r in 0..2 {
        assert_eq!(tokens[r], alone[r].tokens, "request {}", ids[r]);
        assert_bit_identical(&hidden[r].iter().collect::<Vec<_>>(), &final_hidden(&alone[r]), "interleaved");
    }
    // Each request's caches are its own: rows, exports and memory.
    let mut held = shard.requests();
    held.sort();
    assert_eq!(held, vec![(7, positions[0]), (9, positions[1])]);
    let per_token = m.architecture.kv_bytes_per_token_per_layer() * layers as u64;
    assert_eq!(shard.memory_bytes().kv_bytes, (positions[0] + positions[1]) as u64 * per_token);
    let rows_9 = shard.export_kv(0..layers, 0..positions[1]).unwrap();
    shard.switch_request(7).unwrap();
    let rows_7 = shard.export_kv(0..layers, 0..positions[0]).unwrap();
    // The rows each request's solo run holds (before its last token, which it did not feed).
    assert_eq!(rows_7, solo[0][0].export_kv(0..layers, 0..positions[0]).unwrap());
    assert_eq!(rows_9, solo[1][0].export_kv(0..layers, 0..positions[1]).unwrap());
    // A request imported into a fresh context continues exactly (a snapshot restore beside another).
    shard.switch_request(11).unwrap();
    assert_eq!(shard.kv_len(), 0);
    shard.import_kv(&rows_9).unwrap();
    let last = *tokens[1].last().unwrap();
    let a = shard.forward(&gw.embed(&[last]).unwrap(), positions[1]).unwrap();
    shard.switch_request(9).unwrap();
    let b = shard.forward(&gw.embed(&[last]).unwrap(), positions[1]).unwrap();
    assert!(a.bit_identical(&b));
    // Dropped: its memory is freed, the others' stay.
    shard.drop_request(11);
    shard.drop_request(7);
    assert_eq!(shard.requests(), vec![(9, positions[1] + 1)]);
    assert_eq!(shard.memory_bytes().kv_bytes, (positions[1] + 1) as u64 * per_token);
    // Each request's caches have their own capacity, and the reservation follows them.
    let max = m.architecture.max_context;
    assert_eq!(shard.memory_bytes().kv_reserved_bytes, max as u64 * per_token);
    shard.switch_request(12).unwrap();
    shard.set_kv_capacity(40).unwrap();
    shard.forward(&gw.embed(&prompts[0]).unwrap(), 0).unwrap();
    assert_eq!(
        (shard.kv_capacity_of(12), shard.kv_capacity_of(9), shard.kv_capacity_of(7)),
        (Some(40), Some(max), None)
    );
    assert_eq!(shard.memory_bytes().kv_reserved_bytes, (max + 40) as u64 * per_token);
    // A dropped current request lets its buffers go too (none is current then).
    shard.drop_request(12);
    assert_eq!((shard.request(), shard.kv_capacity_of(12)), (0, None));
    shard.switch_request(9).unwrap();
    assert_eq!(shard.memory_bytes().kv_reserved_bytes, max as u64 * per_token);
    assert_eq!(shard.requests(), vec![(9, positions[1] + 1)]);
}
