//! Every load checks the sha256 of the files it opens; an unchanged file is not read twice.
mod common;

use aerokv_engine::{EngineError, Manifest, Shard, INTEGRITY_CACHE};
use common::{models_root, runtime};
use std::os::unix::fs::FileExt;

fn copy_of_tiny(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("aerokv-integrity-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(models_root().join("tiny")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with('.') {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    dir
}

#[test]
fn a_flipped_byte_of_the_same_size_is_refused_with_the_file_named_even_with_its_mtime_restored() {
    let rt = runtime();
    let dir = copy_of_tiny("flip");
    let m = Manifest::load(&dir).unwrap();
    let names: Vec<&str> = m.layer_files.iter().map(|f| f.name.as_str()).collect();
    let first = m.check_files(names.iter().copied()).unwrap();
    assert_eq!((first.files, first.hashed_files), (names.len(), names.len()));
    assert_eq!(first.hashed_bytes, m.layer_files.iter().map(|f| f.bytes).sum::<u64>());
    assert!(dir.join(INTEGRITY_CACHE).is_file());
    // Unchanged files are not read again.
    let again = m.check_files(names.iter().copied()).unwrap();
    assert_eq!((again.files, again.hashed_files), (names.len(), 0));
    println!("integrity check of {} files: first {:?} (hashed), then {:?}", names.len(), first.elapsed, again.elapsed);

    let victim = dir.join(&m.layer_files[1].name);
    let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&victim).unwrap();
    let at = m.layer_files[1].bytes / 2;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&victim).unwrap().len(), m.layer_files[1].bytes);

    let err = Shard::load(&rt, &m, 0..m.architecture.layers).unwrap_err();
    assert!(matches!(err, EngineError::CorruptFile { .. }), "{err}");
    assert!(err.to_string().contains(&m.layer_files[1].name) && err.to_string().contains("sha256"), "{err}");
    // The good files still load; the cache did not learn the bad one.
    Shard::load(&rt, &m, 0..1).unwrap();
    assert!(m.check_files([m.layer_files[1].name.as_str()]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_the_manifest_does_not_name_is_refused() {
    let dir = copy_of_tiny("unknown");
    let m = Manifest::load(&dir).unwrap();
    let err = m.check_files(["extra.onnx"]).unwrap_err();
    assert!(matches!(err, EngineError::InvalidManifest { .. }) && err.to_string().contains("extra.onnx"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
