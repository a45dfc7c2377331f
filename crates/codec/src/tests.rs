use super::*;

/// Hidden-state-like rows: mostly small values, a few large outliers, deterministic.
fn rows(n: usize, width: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_u64;
    (0..n * width)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
            if i % width == 7 {
                u * 300.0
            } else {
                u * 2.0
            }
        })
        .collect()
}

#[test]
fn raw_round_trips_exactly_including_signed_zero_and_subnormals() {
    let mut v = rows(3, 16);
    v[0] = -0.0;
    v[1] = f32::MIN_POSITIVE / 8.0;
    v[2] = f32::MAX;
    let back = ActivationCodec::Raw.round_trip(&v, 16).unwrap();
    assert!(v.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
    let e = KvCodec::Raw.encode(&v).unwrap();
    assert_eq!(e.len(), 4 * v.len());
    let back = KvCodec::Raw.decode(&e, v.len()).unwrap();
    assert!(v.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn zstd_round_trips_exactly() {
    let v = rows(40, 64);
    for data in [&v[..], &v[..1], &[0.0f32; 4096][..]] {
        let e = KvCodec::Zstd.encode(data).unwrap();
        let back = KvCodec::Zstd.decode(&e, data.len()).unwrap();
        assert!(data.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    assert_eq!(unshuffle(&shuffle(&v)), v);
}

#[test]
fn f16_error_is_within_half_an_ulp_of_f16() {
    let v = rows(8, 576);
    let back = ActivationCodec::F16.round_trip(&v, 576).unwrap();
    for (&x, &y) in v.iter().zip(&back) {
        // Normal range: relative 2^-11; below 2^-14 (subnormal f16): absolute 2^-25.
        let bound = if x.abs() >= 2f32.powi(-14) { x.abs() * 2f32.powi(-11) } else { 2f32.powi(-25) };
        assert!((x - y).abs() <= bound, "{x} -> {y}");
    }
    // f16 values are exact in f32: encoding what was decoded changes nothing.
    assert_eq!(ActivationCodec::F16.round_trip(&back, 576).unwrap(), back);
    assert_eq!(ActivationCodec::F16.row_bytes(576), 1152);
}

#[test]
fn int8_error_is_within_half_a_step_of_its_row() {
    let width = 576;
    let v = rows(8, width);
    let enc = ActivationCodec::Int8.encode(&v, width).unwrap();
    assert_eq!(enc.len(), 8 * (4 + width));
    let back = ActivationCodec::Int8.decode(&enc, 8, width).unwrap();
    for (r, (row, got)) in v.chunks(width).zip(back.chunks(width)).enumerate() {
        let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let step = max / 127.0;
        for (&x, &y) in row.iter().zip(got) {
            assert!((x - y).abs() <= step * 0.5 * (1.0 + 1e-5), "row {r}: {x} -> {y} (step {step})");
        }
        // The largest magnitude is kept to f32 rounding.
        let got_max = got.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!((got_max - max).abs() <= max * 1e-6, "{got_max} vs {max}");
    }
    // A zero row has scale 0 and decodes to zeros; rounding is half away from zero.
    let z = ActivationCodec::Int8.round_trip(&[0.0; 4], 4).unwrap();
    assert_eq!(z, vec![0.0; 4]);
    let e = ActivationCodec::Int8.encode(&[127.0, 0.5, -0.5, 1.5], 4).unwrap();
    assert_eq!(&e[4..], &[127u8, 1, (-1i8) as u8, 2]);
}

#[test]
fn encoding_refuses_what_it_cannot_carry() {
    for c in ActivationCodec::ALL {
        assert!(matches!(c.encode(&[1.0, f32::NAN], 2), Err(CodecError::NotFinite { index: 1, .. })), "{c}");
        assert!(matches!(c.encode(&[1.0, 2.0, 3.0], 2), Err(CodecError::Shape(_))), "{c}");
        assert!(matches!(c.encode(&[1.0], 0), Err(CodecError::Shape(_))), "{c}");
    }
    assert!(matches!(ActivationCodec::F16.encode(&[1.0, 70000.0], 2), Err(CodecError::F16Range { index: 1, .. })));
    assert!(ActivationCodec::F16.encode(&[65504.0], 1).is_ok());
    assert!(matches!(KvCodec::Zstd.encode(&[f32::INFINITY]), Err(CodecError::NotFinite { .. })));
}

#[test]
fn names_parse_and_unknown_ones_are_refused_with_the_list() {
    for c in ActivationCodec::ALL {
        assert_eq!(c.name().parse::<ActivationCodec>().unwrap(), c);
    }
    for c in KvCodec::ALL {
        assert_eq!(c.name().parse::<KvCodec>().unwrap(), c);
    }
    let e = "bf16".parse::<ActivationCodec>().unwrap_err().to_string();
    assert!(e.contains("\"bf16\"") && e.contains("raw, f16, int8"), "{e}");
    let e = "int8".parse::<KvCodec>().unwrap_err().to_string();
    assert!(e.contains("raw, zstd"), "{e}");
    assert!(check_dtype("f32").is_ok());
    assert!(matches!(check_dtype("f16"), Err(CodecError::Dtype(_))));
}

#[test]
fn bytes_per_element_matches_the_payloads() {
    let width = 576;
    let v = rows(3, width);
    for c in ActivationCodec::ALL {
        let bytes = c.encode(&v, width).unwrap().len() as f64;
        assert_eq!(bytes, c.bytes_per_element(width) * v.len() as f64, "{c}");
    }
    assert_eq!(ActivationCodec::Raw.bytes_per_element(width), 4.0);
    assert_eq!(ActivationCodec::F16.bytes_per_element(width), 2.0);
    assert!(KvCodec::Zstd.bytes_per_element() < KvCodec::Raw.bytes_per_element());
}

#[test]
fn hostile_activation_payloads_are_refused_without_panic() {
    let width = 8;
    for c in ActivationCodec::ALL {
        let good = c.encode(&rows(2, width), width).unwrap();
        // Wrong lengths, claimed shapes that overflow, zero width.
        for (bytes, n, w) in [
            (&good[..good.len() - 1], 2, width),
            (&good[..], 3, width),
            (&good[..], 1, width),
            (&good[..], usize::MAX / 2, width),
            (&good[..], 2, 0),
            (&[][..], 0, usize::MAX),
        ] {
            assert!(c.decode(bytes, n, w).is_err(), "{c}: {} bytes as {n} x {w}", bytes.len());
        }
        assert!(Encoded::from_wire(c, 0, width, Vec::new()).is_err());
        assert!(Encoded::from_wire(c, 3, width, good.clone()).is_err());
    }
    // f16 infinities and NaNs are never produced by the encoder.
    let inf = half::f16::INFINITY.to_le_bytes();
    assert!(matches!(ActivationCodec::F16.decode(&inf, 1, 1), Err(CodecError::NotFinite { .. })));
    let nan = half::f16::NAN.to_le_bytes();
    assert!(ActivationCodec::F16.decode(&nan, 1, 1).is_err());
    assert!(ActivationCodec::Raw.decode(&f32::NAN.to_le_bytes(), 1, 1).is_err());
    // int8: bad scales, -128.
    for scale in [f32::NAN, f32::INFINITY, -1.0] {
        let mut b = scale.to_le_bytes().to_vec();
        b.push(1);
        assert!(matches!(ActivationCodec::Int8.decode(&b, 1, 1), Err(CodecError::Scale { row: 0, .. })), "{scale}");
    }
    let mut b = 1f32.to_le_bytes().to_vec();
    b.push(0x80);
    assert!(matches!(ActivationCodec::Int8.decode(&b, 1, 1), Err(CodecError::Int8Range { row: 0 })));
    // A huge finite scale times 127 overflows to infinity: refused, not passed on.
    let mut b = f32::MAX.to_le_bytes().to_vec();
    b.push(127);
    assert!(matches!(ActivationCodec::Int8.decode(&b, 1, 1), Err(CodecError::NotFinite { .. })));
}

#[test]
fn hostile_kv_payloads_are_refused_and_decompression_is_bounded() {
    let v = rows(4, 64);
    let good = KvCodec::Zstd.encode(&v).unwrap();
    // Declared smaller than the content: zstd stops at the bound.
    assert!(KvCodec::Zstd.decode(&good, v.len() - 1).is_err());
    // Declared larger: the sizes differ.
    assert!(KvCodec::Zstd.decode(&good, v.len() + 1).is_err());
    // A bomb: 64 MiB of zeros compresses to a few KB; declared as 16 floats it is refused
    // after at most 64 bytes of output.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
    assert!(bomb.len() < 64 << 10);
    assert!(KvCodec::Zstd.decode(&bomb, 16).is_err());
    // Garbage, truncation, overflowing claims.
    assert!(KvCodec::Zstd.decode(&[1, 2, 3, 4, 5], 4).is_err());
    assert!(KvCodec::Zstd.decode(&good[..good.len() / 2], v.len()).is_err());
    assert!(KvCodec::Zstd.decode(&good, usize::MAX / 2).is_err());
    assert!(KvCodec::Raw.decode(&[0; 7], 2).is_err());
    // Non-finite values in a valid stream.
    let nan = KvCodec::Raw.encode(&[1.0]).map(|_| shuffle(&[f32::NAN])).unwrap();
    let packed = zstd::bulk::compress(&nan, 1).unwrap();
    assert!(matches!(KvCodec::Zstd.decode(&packed, 1), Err(CodecError::NotFinite { .. })));
}

#[test]
fn chunks_concatenate_and_split_back() {
    let width = 16;
    for c in ActivationCodec::ALL {
        let a = Encoded::encode(c, &rows(3, width), width).unwrap();
        let b = Encoded::encode(c, &rows(1, width), width).unwrap();
        let packed = Encoded::concat([&a, &b]).unwrap();
        assert_eq!(packed.rows(), 4);
        let mut both = a.decode().unwrap();
        both.extend(b.decode().unwrap());
        assert_eq!(packed.decode().unwrap(), both);
        assert_eq!(packed.split(&[3, 1]).unwrap(), vec![a.clone(), b.clone()]);
        assert!(packed.split(&[2, 1]).is_err());
        assert!(packed.split(&[4, 0]).is_err());
        assert!(packed.split(&[usize::MAX, 5]).is_err());
        let other = Encoded::encode(c, &rows(1, 8), 8).unwrap();
        assert!(Encoded::concat([&a, &other]).is_err());
    }
    assert!(Encoded::concat([]).is_err());
}
