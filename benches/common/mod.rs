//! What the benchmarks share.

use mixtral_q::format::GgmlType;

/// Deterministic pseudo-random bytes (xorshift), with every block's f16 scales set to small finite values.
pub fn weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut w: Vec<u8> = (0..rows * ty.bytes_for(cols).expect("whole blocks"))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.005).to_le_bytes();
    let scale_at: &[usize] = match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[0],
    };
    for b in w.chunks_exact_mut(ty.block_bytes()) {
        for &at in scale_at {
            b[at..at + 2].copy_from_slice(&scale);
        }
    }
    w
}
