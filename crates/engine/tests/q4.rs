//! Tests on the real model (`q4`: exact 4-bit SmolLM2-135M-Instruct, 30 layers).
mod common;

use aerokv_engine::{GenerateOptions, Model, Shard};
use common::*;

const PROMPT: &str = "Why do drones need batteries?";

#[test]
fn q4_any_split_of_30_layers_is_bit_identical_to_one_interval() {
    let rt = runtime();
    let m = manifest("q4");
    assert_eq!(m.architecture.layers, 30);
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    let mut whole = shards(&rt, &m, &[30]);
    let reference = run_pipeline(&mut gw, &mut whole, &prompt, 8);
    drop(whole);
    for split in [vec![7, 8, 7, 8], vec![1, 29], vec![1; 30]] {
        let mut parts = shards(&rt, &m, &split);
        let trace = run_pipeline(&mut gw, &mut parts, &prompt, 8);
        assert_eq!(trace.tokens, reference.tokens, "split {split:?}");
        assert_bit_identical(&final_hidden(&trace), &final_hidden(&reference), &format!("split {split:?}"));
    }
}

#[test]
fn q4_snapshot_then_replay_one_token_at_a_time_continues_identically() {
    let rt = runtime();
    let m = manifest("q4");
    let mut gw = aerokv_engine::Gateway::load(&rt, &m).unwrap();
    let prompt = gw.encode_chat(PROMPT).unwrap();
    // The failed drone held [12, 30) and snapshotted its tail [20, 30) after chunk 4.
    let mut stages = shards(&rt, &m, &[12, 18]);
    let snap_chunk = 4;
    let mut snapshot = None;
    let trace = run_pipeline_with(&mut gw, &mut stages, &prompt, 12, |chunk, stages| {
        if chunk == snap_chunk {
            snapshot = Some(stages[1].export_kv(20..30, 0..stages[1].kv_len()).unwrap());
        }
    });
    let snapshot = snapshot.unwrap();
    let final_kv = stages[1].export_kv(20..30, 0..stages[1].kv_len()).unwrap();
    drop(stages);

    // The successor: the head [12, 20) is a live replica (fed every chunk), the tail is restored
    // from the snapshot and replays the buffered tail inputs, chunk by chunk.
    let mut replica_head = Shard::load(&rt, &m, 12..20).unwrap();
    let mut tail = Shard::load(&rt, &m, 20..30).unwrap();
    // A cache with just the room the request needs: the capacity does not change the bits.
    let final_len = final_kv.token_start + final_kv.tokens;
    tail.set_kv_capacity(final_len).unwrap();
    tail.import_kv(&snapshot).unwrap();
    let mut buffered = Vec::new();
    for (chunk, io) in trace.stage_io.iter().enumerate() {
        let head_out = replica_head.forward(&io[1].0, trace.positions[chunk]).unwrap();
        if chunk > snap_chunk {
            buffered.push((head_out, trace.positions[chunk], &io[1].1));
        }
    }
    for (input, position, expected) in buffered {
        let out = tail.forward(&input, position).unwrap();
        assert!(out.bit_identical(expected), "replayed output at position {position} differs");
    }
    assert_eq!(tail.export_kv(20..30, 0..tail.kv_len()).unwrap(), final_kv);
    // The promoted replica and the recovered tail become one native interval of the successor.
    let joined = replica_head.join(tail).unwrap();
    assert_eq!(joined.layers(), 12..30);
    // The joined shard has the replica's (larger) capacity, with the recovered rows moved over.
    assert_eq!(joined.kv_capacity(), m.architecture.max_context);
    assert_eq!(joined.export_kv(20..30, 0..final_len).unwrap(), final_kv);
}

#[test]
fn q4_generate_answers_sensibly() {
    let rt = runtime();
    let mut model = Model::load(&rt, manifest("q4").dir).unwrap();
    let g = model
        .generate("What is the capital of France?", &GenerateOptions { max_tokens: 16, ..Default::default() }, |_| {})
        .unwrap();
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
    assert!(g.tokens_per_s > 0.0);
    let mem = model.shard.memory_bytes();
    assert_eq!(mem.kv_bytes_per_token, 30 * 1536);
    assert!(mem.weight_bytes > 50_000_000, "{mem:?}");
}
