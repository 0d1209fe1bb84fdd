//! Quantized matvec/matmul kernels at Mixtral's shapes, the memory bandwidth they compete with, and the
//! weight reads of one token of a 2-layer Mixtral-width model (hidden 4096, FFN 14336, Q4_K weights, Q6_K
//! output head). `MIXTRAL_Q_SIMD=scalar|avx2|avx512` picks a lower SIMD level.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;

use mixtral_q::engine::cpu::dot::{matmul, matvec, simd_level, QuantizedActivations};
use mixtral_q::format::GgmlType;

mod common;
use common::weights;

fn activations(ty: GgmlType, cols: usize, seed: usize) -> QuantizedActivations {
    let x: Vec<f32> = (0..cols).map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect();
    QuantizedActivations::new(ty, &x).expect("activations")
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn kernels(c: &mut Criterion) {
    eprintln!("dot kernels: simd level {}, {} threads", simd_level(), rayon::current_num_threads());
    let mut g = c.benchmark_group("matvec");
    for (ty, rows, cols) in [
        (GgmlType::Q4_K, 14336, 4096),
        (GgmlType::Q4_K, 4096, 14336),
        (GgmlType::Q6_K, 32000, 4096),
        (GgmlType::Q8_0, 1024, 4096),
    ] {
        let w = weights(ty, rows, cols, 1);
        let x = activations(ty, cols, 0);
        let mut out = vec![0f32; rows];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(format!("{ty} {rows}x{cols}"), |b| {
            b.iter(|| matvec(ty, &w, rows, cols, &x, &mut out).expect("matvec"))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("matmul 64 tokens");
    for (ty, rows, cols) in [(GgmlType::Q4_K, 14336, 4096), (GgmlType::Q4_K, 4096, 14336)] {
        let w = weights(ty, rows, cols, 2);
        let xs: Vec<_> = (0..64).map(|t| activations(ty, cols, t)).collect();
        let mut out = vec![0f32; rows * xs.len()];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(format!("{ty} {rows}x{cols}"), |b| {
            b.iter(|| matmul(ty, &w, rows, cols, &xs, &mut out).expect("matmul"))
        });
    }
    g.finish();
}

/// Reading 1 GiB with all threads: the ceiling for memory-bound matvec.
fn memory(c: &mut Criterion) {
    let data: Vec<u64> = (0..(1u64 << 27)).collect();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Bytes(8 << 27));
    g.bench_function("sum 1 GiB", |b| {
        b.iter(|| {
            black_box(
                data.par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
                    .reduce(|| 0, u64::wrapping_add),
            )
        })
    });
    g.finish();
}

/// One matrix of the model: type, rows, cols, weights.
struct Matrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    w: Vec<u8>,
}

impl Matrix {
    fn new(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Matrix {
        Matrix { ty, rows, cols, w: weights(ty, rows, cols, seed) }
    }

    /// Quantizes the inputs and multiplies, as the engine does per matrix.
    fn apply(&self, x: &[Vec<f32>]) -> Vec<f32> {
        let xs: Vec<_> =
            x.iter().map(|x| QuantizedActivations::new(self.ty, x).expect("activations")).collect();
        let mut out = vec![0f32; self.rows * x.len()];
        matmul(self.ty, &self.w, self.rows, self.cols, &xs, &mut out).expect("matmul");
        out
    }
}

/// The weight products of a 2-layer Mixtral-width model (no attention math, norms or routing: those
/// are small next to the weight reads). Decode: one token through attention, 2 experts and the output
/// head. Prompt (64 tokens): attention for all, each of the 8 experts gets 64 × 2 / 8 = 16 tokens,
/// output head for the last token only (as llama.cpp does).
fn model(c: &mut Criterion) {
    let (hidden, ffn, vocab, kv) = (4096, 14336, 32000, 1024);
    let q4 = GgmlType::Q4_K;
    let mut seed = 10;
    let mut next = || {
        seed += 1;
        seed
    };
    let layers: Vec<(Vec<Matrix>, Vec<[Matrix; 3]>)> = (0..2)
        .map(|_| {
            let attn =
                [hidden, kv, kv, hidden].iter().map(|&rows| Matrix::new(q4, rows, hidden, next())).collect();
            let experts = (0..8)
                .map(|_| {
                    [
                        Matrix::new(q4, ffn, hidden, next()),
                        Matrix::new(q4, ffn, hidden, next()),
                        Matrix::new(q4, hidden, ffn, next()),
                    ]
                })
                .collect();
            (attn, experts)
        })
        .collect();
    let output = Matrix::new(GgmlType::Q6_K, vocab, hidden, next());
    let bytes_per_token: usize = layers
        .iter()
        .map(|(attn, experts)| {
            attn.iter().map(|m| m.w.len()).sum::<usize>()
                + experts[..2].iter().flatten().map(|m| m.w.len()).sum::<usize>()
        })
        .sum::<usize>()
        + output.w.len();
    eprintln!("2-layer model: {:.1} MB of weights read per decoded token", bytes_per_token as f64 / 1e6);

    let run = |n_tok: usize| {
        let x: Vec<Vec<f32>> =
            (0..n_tok).map(|t| (0..hidden).map(|i| ((i + t) % 17) as f32 * 0.1 - 0.8).collect()).collect();
        for (attn, experts) in &layers {
            for m in attn {
                black_box(m.apply(&x[..]));
            }
            let per_expert = (n_tok * 2).div_ceil(8).min(n_tok);
            let used = if n_tok == 1 { &experts[..2] } else { &experts[..] };
            for [gate, up, down] in used {
                let xs = &x[..per_expert];
                black_box((gate.apply(xs), up.apply(xs)));
                let h: Vec<Vec<f32>> = xs.iter().map(|_| vec![0.01; ffn]).collect();
                black_box(down.apply(&h));
            }
        }
        black_box(output.apply(&x[n_tok - 1..]));
    };
    let mut g = c.benchmark_group("2-layer model");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode 1 token", |b| b.iter(|| run(1)));
    g.throughput(Throughput::Elements(64));
    g.bench_function("prompt 64 tokens", |b| b.iter(|| run(64)));
    g.finish();
}

criterion_group! { name = benches; config = config(); targets = kernels, memory, model }
criterion_main!(benches);
