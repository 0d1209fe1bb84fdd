//! Our decoders against an independent one: llama.cpp's `gguf` Python package dequantizes what our
//! quantizers wrote to exactly the same f32 values, for every type we encode that the package decodes.

mod common;

use common::*;
use mixtral_q::format::codec::{can_quantize, dequantize_to_vec, quantize_to_vec, QK_K};
use mixtral_q::format::GgmlType;

/// Deterministic rows: smooth, spiky and sign-biased values, so every level and scale bit is used.
fn test_values(n: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let spike = if i % 97 == 13 { 8.0 } else { 1.0 };
            let bias = if (i / QK_K) % 3 == 1 { 0.3 } else { 0.0 };
            (u + bias) * spike * (1.0 + (i / QK_K) as f32)
        })
        .collect()
}

#[test]
fn gguf_package_decodes_our_encodings_to_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    // Q8_K is an activation format: the package has no decoder for it; F32 is a plain copy.
    let types: Vec<GgmlType> = GgmlType::ALL
        .into_iter()
        .filter(|&t| can_quantize(t) && t != GgmlType::Q8_K && t != GgmlType::F32)
        .collect();
    assert!(types.contains(&GgmlType::Q2_K) && types.contains(&GgmlType::Q3_K));
    let n = 6 * QK_K;
    let x = test_values(n);
    let script = r#"
import sys, numpy as np, gguf
d, n = sys.argv[1], int(sys.argv[2])
for name in sys.argv[3:]:
    ty = int(name)
    raw = np.fromfile(f"{d}/{ty}.bin", dtype=np.uint8)
    v = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType(ty)).astype(np.float32).ravel()
    assert v.size == n, (ty, v.size)
    v.tofile(f"{d}/{ty}.f32")
"#;
    let mut args = vec![dir.path().to_str().unwrap().to_string(), n.to_string()];
    for &ty in &types {
        std::fs::write(dir.path().join(format!("{}.bin", ty.id())), quantize_to_vec(ty, &x).unwrap())
            .unwrap();
        args.push(ty.id().to_string());
    }
    let o = std::process::Command::new(python()).arg("-c").arg(script).args(&args).output().unwrap();
    assert!(o.status.success(), "gguf package failed: {}", stderr(&o));
    for &ty in &types {
        let bytes = std::fs::read(dir.path().join(format!("{}.bin", ty.id()))).unwrap();
        let ours = dequantize_to_vec(ty, &bytes, n).unwrap();
        let theirs: Vec<f32> = std::fs::read(dir.path().join(format!("{}.f32", ty.id())))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(theirs.len(), n, "{ty}");
        for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
            // Both follow ggml's formulas in f32, so the values agree exactly.
            assert_eq!(a, b, "{ty} value {i}: ours {a}, gguf package {b}");
        }
    }
}
