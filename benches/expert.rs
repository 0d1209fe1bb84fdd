//! One Mixtral-8x7B expert (gate, up, down: Q4_K, 14336x4096) on the host, for 1 and 8 tokens: what a
//! missing expert costs on the CPU, against a copy of its 99 MB over PCIe (the hybrid scheduler's
//! cost model measures the same thing at start-up; its figures are printed first).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use mixtral_q::engine::cpu::{CpuBackend, CpuTensor, Routes};
use mixtral_q::engine::hybrid::cost::DEFAULT_COPY_BYTES_PER_S;
use mixtral_q::engine::hybrid::ExpertCosts;
use mixtral_q::engine::transformer::Backend;
use mixtral_q::format::GgmlType;
use mixtral_q::model::weights::{ExpertWeights, Matrix};
use mixtral_q::model::ModelConfig;

mod common;
use common::weights;

fn expert(c: &mut Criterion) {
    let cfg = ModelConfig::mixtral_8x7b(32);
    let (h, f) = (cfg.hidden_size, cfg.ffn_size);
    let q4_k = |rows, cols, seed| weights(GgmlType::Q4_K, rows, cols, seed);
    let (gate, up, down) = (q4_k(f, h, 1), q4_k(f, h, 2), q4_k(h, f, 3));
    let m = |data: &'static [u8], rows, cols| Matrix::new(GgmlType::Q4_K, rows, cols, data).unwrap();
    let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
    let e = ExpertWeights { gate: m(leak(gate), f, h), up: m(leak(up), f, h), down: m(leak(down), h, f) };
    let bytes = (e.gate.data.len() + e.up.data.len() + e.down.data.len()) as u64;
    let costs = ExpertCosts::measure_cached_in(&cfg, &e, DEFAULT_COPY_BYTES_PER_S, None).unwrap();
    println!("{} threads; {costs}", rayon::current_num_threads());

    let mut cpu = CpuBackend::new(&cfg);
    let experts = vec![e];
    let mut group = c.benchmark_group("expert_q4_k_on_host");
    group.sample_size(20).measurement_time(Duration::from_secs(5)).throughput(Throughput::Bytes(bytes));
    for tokens in [1, 8] {
        let x = CpuTensor::new((0..tokens * h).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect(), h);
        let routes = Routes::new(vec![vec![(0, 1.0)]; tokens], 1);
        group.bench_function(format!("{tokens}_tokens"), |b| {
            b.iter(|| black_box(cpu.moe(0, &experts, &x, &routes).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, expert);
criterion_main!(benches);
