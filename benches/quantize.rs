//! Quantize throughput (input MB/s): a random bf16 checkpoint of Mixtral's layout at 1024 wide
//! (FFN 3584, 8 experts, 2 layers, ~150 MB of bf16) converted to each target type.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixtral_q::model::ModelConfig;
use mixtral_q::quantize::{quantize_checkpoint, QuantizeOptions, Target};
use mixtral_q::synth::{write_hf_checkpoint, HfDtype, RandomWeights};

fn quantize_throughput(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let hf = dir.path().join("hf");
    let cfg = ModelConfig {
        hidden_size: 1024,
        ffn_size: 3584,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
        ..ModelConfig::mixtral_8x7b(2)
    };
    write_hf_checkpoint(&hf, &RandomWeights::new(cfg, 7), HfDtype::Bf16, 64 << 20, 7).expect("synth");
    let input_bytes: u64 = std::fs::read_dir(&hf)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();

    let mut group = c.benchmark_group("quantize");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(input_bytes));
    for target in [Target::Q4K, Target::Q4_0, Target::Q8_0, Target::F16] {
        let out = dir.path().join(format!("out-{}.gguf", target.name()));
        group.bench_function(target.name(), |b| {
            b.iter(|| quantize_checkpoint(&hf, &out, &QuantizeOptions::new(target)).expect("quantize"))
        });
    }
    group.finish();
}

criterion_group!(benches, quantize_throughput);
criterion_main!(benches);
