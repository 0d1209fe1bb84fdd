//! Block encoder throughput (MB/s of f32 input, one thread): each quantized type on Gaussian rows
//! 4096 wide, without and with importance weights. The scale searches are what `quantize` spends its
//! time in; this isolates them from reading and writing files.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mixtral_q::format::codec;
use mixtral_q::format::GgmlType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const COLS: usize = 4096;
const ROWS: usize = 16;

fn gaussian_rows(seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..COLS * ROWS)
        .map(|_| {
            let u: f32 = 1.0 - rng.random::<f32>();
            let v: f32 = rng.random();
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let x = gaussian_rows(1);
    // Importance of each column: mean squared activations vary over orders of magnitude in real models.
    let mut rng = StdRng::seed_from_u64(2);
    let importance: Vec<f32> = (0..COLS).map(|_| (rng.random::<f32>() * 6.0).exp()).collect();
    let mut group = c.benchmark_group("encode");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((x.len() * 4) as u64));
    use GgmlType::*;
    for ty in [Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q8_0] {
        let mut out = vec![0u8; ty.bytes_for(x.len()).expect("whole blocks")];
        group.bench_function(BenchmarkId::new("plain", ty.name()), |b| {
            b.iter(|| codec::quantize(ty, &x, &mut out).expect("encode"))
        });
        group.bench_function(BenchmarkId::new("importance", ty.name()), |b| {
            b.iter(|| codec::quantize_weighted(ty, &x, &importance, &mut out).expect("encode"))
        });
    }
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
