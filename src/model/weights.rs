//! Weight handles into a memory-mapped GGUF: every big matrix is a typed view of the file's bytes
//! (zero copy); only the small norm vectors are dequantized to f32 at load.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::names::{self, LayerTensor};
use super::ModelConfig;
use crate::format::codec;
use crate::format::gguf::{GgufFile, TensorInfo};
use crate::format::GgmlType;

/// Tensor types the engines compute with (derived from the type descriptors).
pub const SUPPORTED_TYPES: [GgmlType; GgmlType::COMPUTABLE.len()] = GgmlType::COMPUTABLE;

/// One weight matrix inside the mapped file: type, row-major `[rows, cols]` (row r = output r), bytes.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Matrix<'a> {
    /// Checks that `data` holds exactly `rows` rows of whole blocks.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Matrix<'a>> {
        if !SUPPORTED_TYPES.contains(&ty) {
            return Err(crate::Error::UnsupportedType(ty).into());
        }
        let row_bytes = ty.bytes_for(cols).with_context(|| {
            format!("rows of {cols} values are not whole {ty} blocks of {}", ty.block_len())
        })?;
        ensure!(
            row_bytes.checked_mul(rows) == Some(data.len()),
            "{} bytes for {rows}×{cols} {ty} values (expected {})",
            data.len(),
            row_bytes.saturating_mul(rows)
        );
        Ok(Matrix { ty, rows, cols, data })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_len() * self.ty.block_bytes()
    }

    /// The encoded bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.row_bytes()..][..self.row_bytes()]
    }

    /// Row `r` decoded into `out` (`[cols]`): how token embeddings are read, one row per token.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        codec::dequantize(self.ty, self.row(r), out)
    }
}

/// Shape and type only: the bytes are megabytes.
impl std::fmt::Debug for Matrix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Matrix({} {}×{})", self.ty, self.rows, self.cols)
    }
}

/// One expert's SwiGLU FFN: `down(silu(gate x) * up x)`.
#[derive(Clone, Copy)]
pub struct ExpertWeights<'a> {
    /// w1, `[ffn, hidden]`.
    pub gate: Matrix<'a>,
    /// w3, `[ffn, hidden]`.
    pub up: Matrix<'a>,
    /// w2, `[hidden, ffn]`.
    pub down: Matrix<'a>,
}

pub struct LayerWeights<'a> {
    pub attn_norm: Vec<f32>,
    pub attn_q: Matrix<'a>,
    pub attn_k: Matrix<'a>,
    pub attn_v: Matrix<'a>,
    pub attn_output: Matrix<'a>,
    pub ffn_norm: Vec<f32>,
    /// `[n_experts, hidden]`.
    pub router: Matrix<'a>,
    pub experts: Vec<ExpertWeights<'a>>,
}

pub struct ModelWeights<'a> {
    /// `[vocab, hidden]`.
    pub token_embd: Matrix<'a>,
    pub layers: Vec<LayerWeights<'a>>,
    pub output_norm: Vec<f32>,
    /// `[vocab, hidden]`.
    pub output: Matrix<'a>,
}

impl<'a> ModelWeights<'a> {
    /// Finds every tensor of `cfg` in `file` and checks its shape and type. Experts are read from the
    /// merged `blk.N.ffn_*_exps` tensors, or from the older one-tensor-per-expert layout.
    pub fn from_gguf(file: &'a GgufFile, cfg: &ModelConfig) -> Result<ModelWeights<'a>> {
        Self::find_all(file, cfg).with_context(|| format!("in {}", file.path.display()))
    }

    fn find_all(file: &'a GgufFile, cfg: &ModelConfig) -> Result<ModelWeights<'a>> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let m = |t: LayerTensor| {
                    let shape = cfg.layer_tensor_shape(t);
                    matrix(file, &t.gguf_name(l), shape[0], shape[1])
                };
                let v = |t: LayerTensor| vector(file, &t.gguf_name(l), hidden);
                let gates = experts(file, cfg, l, LayerTensor::FfnGateExps)?;
                let ups = experts(file, cfg, l, LayerTensor::FfnUpExps)?;
                let downs = experts(file, cfg, l, LayerTensor::FfnDownExps)?;
                Ok(LayerWeights {
                    attn_norm: v(LayerTensor::AttnNorm)?,
                    attn_q: m(LayerTensor::AttnQ)?,
                    attn_k: m(LayerTensor::AttnK)?,
                    attn_v: m(LayerTensor::AttnV)?,
                    attn_output: m(LayerTensor::AttnOutput)?,
                    ffn_norm: v(LayerTensor::FfnNorm)?,
                    router: m(LayerTensor::FfnGateInp)?,
                    experts: (0..cfg.n_experts)
                        .map(|e| ExpertWeights { gate: gates[e], up: ups[e], down: downs[e] })
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            token_embd: matrix(file, names::TOKEN_EMBD, vocab, hidden)?,
            layers,
            output_norm: vector(file, names::OUTPUT_NORM, hidden)?,
            output: matrix(file, names::OUTPUT, vocab, hidden)?,
        })
    }
}

/// A GGUF file opened for inference: the mapping and the hyperparameters read from its metadata.
pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
}

impl Model {
    /// Opens and maps `path`, reads the config and validates every tensor (nothing big is read yet).
    pub fn load(path: &Path) -> Result<Model> {
        let file = GgufFile::open(path)?;
        let config =
            ModelConfig::from_gguf(&file.metadata).with_context(|| format!("in {}", path.display()))?;
        check_layers(&config).with_context(|| format!("in {}", path.display()))?;
        let model = Model { file, config };
        model.weights()?;
        Ok(model)
    }

    /// Weight handles into the mapping (cheap: only the norm vectors are decoded).
    pub fn weights(&self) -> Result<ModelWeights<'_>> {
        ModelWeights::from_gguf(&self.file, &self.config)
    }
}

/// The layer kinds whose weights this loader (and the quantizer, requantizing a file) finds. The spec
/// and the forward pass describe dense layers and shared experts too, but their tensors
/// (`blk.N.ffn_gate.weight`, `*_shexp`) are not read yet: such files are refused with what they are.
pub(crate) fn check_layers(cfg: &ModelConfig) -> Result<()> {
    if cfg.n_experts == 0 {
        bail!("llama.expert_count is missing or 0: this is a dense llama model, not Mixtral");
    }
    if cfg.n_leading_dense > 0 {
        bail!(
            "layers 0..{} have dense FFNs (llama.leading_dense_block_count): not supported yet",
            cfg.n_leading_dense
        );
    }
    if cfg.shared_ffn_size > 0 {
        bail!("the MoE layers have shared experts (llama.expert_shared_*): not supported yet");
    }
    Ok(())
}

fn find<'f>(file: &'f GgufFile, name: &str) -> Result<&'f TensorInfo> {
    file.tensor(name).with_context(|| format!("tensor {name} is missing"))
}

/// Ggml dims are innermost first: a row-major `[rows, cols]` matrix is stored as `[cols, rows]`.
fn check_dims(info: &TensorInfo, expected: &[usize]) -> Result<()> {
    let dims: Vec<usize> = info.dims.iter().map(|&d| d as usize).collect();
    ensure!(dims == expected, "tensor {} has dims {dims:?}, expected {expected:?}", info.name);
    Ok(())
}

fn matrix<'f>(file: &'f GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix<'f>> {
    let info = find(file, name)?;
    check_dims(info, &[cols, rows])?;
    Matrix::new(info.ty, rows, cols, file.tensor_data(info)).with_context(|| format!("tensor {name}"))
}

/// A 1-D tensor (a norm's weights), decoded to f32.
fn vector(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>> {
    let info = find(file, name)?;
    check_dims(info, &[len])?;
    let mut out = vec![0.0; len];
    codec::dequantize(info.ty, file.tensor_data(info), &mut out).with_context(|| format!("tensor {name}"))?;
    Ok(out)
}

/// The `n_experts` matrices of one expert tensor kind in layer `layer`: slabs of the merged tensor
/// (`[cols, rows, n_experts]` in ggml order, expert-major), or one tensor per expert.
fn experts<'f>(
    file: &'f GgufFile,
    cfg: &ModelConfig,
    layer: usize,
    t: LayerTensor,
) -> Result<Vec<Matrix<'f>>> {
    let (rows, cols) = match cfg.layer_tensor_shape(t)[..] {
        [rows, cols] => (rows, cols),
        _ => bail!("{t:?} is not a matrix"),
    };
    let merged = t.gguf_name(layer);
    if let Some(info) = file.tensor(&merged) {
        check_dims(info, &[cols, rows, cfg.n_experts])?;
        let data = file.tensor_data(info);
        let slab = data.len() / cfg.n_experts;
        return (0..cfg.n_experts)
            .map(|e| Matrix::new(info.ty, rows, cols, &data[e * slab..][..slab]))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("tensor {merged}"));
    }
    (0..cfg.n_experts)
        .map(|e| {
            let name =
                t.per_expert_gguf_name(layer, e).with_context(|| format!("{t:?} is not an expert tensor"))?;
            if e == 0 && file.tensor(&name).is_none() {
                bail!("tensor {merged} is missing (and so is the per-expert {name})");
            }
            matrix(file, &name, rows, cols)
        })
        .collect()
}

/// A tiny random model written as a real GGUF file, for the unit tests of the model and the engines.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use anyhow::Result;

    use crate::format::gguf::{GgufFileWriter, GgufLayout, Metadata};
    use crate::format::GgmlType;
    use crate::model::ModelConfig;

    /// `n` values in [-1, 1) from a linear congruential generator: deterministic test inputs.
    pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// One tensor to write: name, ggml dims, type, bytes.
    pub type Tensor = (String, Vec<u64>, GgmlType, Vec<u8>);

    /// 2 layers, GQA with 2 query heads per KV head, 4 experts with top-2.
    pub fn tiny_config() -> ModelConfig {
        ModelConfig {
            vocab_size: 64,
            hidden_size: 32,
            ffn_size: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            n_experts: 4,
            n_experts_used: 2,
            context_length: 32,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            n_leading_dense: 0,
            dense_ffn_size: 64,
            shared_ffn_size: 0,
            gating: crate::model::spec::Gating::MIXTRAL,
        }
    }

    /// Every tensor of `cfg` in f32: norms near 1, matrices uniform, scaled so activations stay near 1.
    /// With `per_expert`, experts are written in the older one-tensor-per-expert layout (same values).
    pub fn tiny_tensors(cfg: &ModelConfig, per_expert: bool) -> Vec<Tensor> {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut out = Vec::new();
        for (name, dims) in cfg.gguf_tensors() {
            let n: u64 = dims.iter().product();
            let values: Vec<f32> = if dims.len() == 1 {
                (0..n).map(|i| 1.0 + 0.01 * i as f32).collect()
            } else {
                let scale = 2.0 / (dims[0] as f32).sqrt();
                (0..n)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                    })
                    .collect()
            };
            let bytes: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
            if per_expert && dims.len() == 3 {
                // blk.N.ffn_gate_exps.weight -> blk.N.ffn_gate.E.weight
                let slab = bytes.len() / dims[2] as usize;
                for (e, chunk) in bytes.chunks_exact(slab).enumerate() {
                    let name = name.replace("_exps.weight", &format!(".{e}.weight"));
                    out.push((name, dims[..2].to_vec(), GgmlType::F32, chunk.to_vec()));
                }
            } else {
                out.push((name, dims, GgmlType::F32, bytes));
            }
        }
        out
    }

    pub fn write_gguf(path: &Path, cfg: &ModelConfig, tensors: &[Tensor]) -> Result<()> {
        let mut meta = Metadata::new();
        cfg.to_gguf(&mut meta);
        let infos = tensors.iter().map(|(n, d, t, _)| (n.clone(), d.clone(), *t)).collect();
        let file = std::fs::File::create(path)?;
        let writer = GgufFileWriter::new(&file, GgufLayout::new(meta, infos)?)?;
        for (i, t) in tensors.iter().enumerate() {
            writer.write_tensor(i, &t.3)?;
        }
        writer.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn load(dir: &Path, name: &str, tensors: &[Tensor]) -> Result<Model> {
        let path = dir.join(name);
        write_gguf(&path, &tiny_config(), tensors).unwrap();
        Model::load(&path)
    }

    #[test]
    fn merged_and_per_expert_layouts_give_the_same_experts() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        let merged = load(dir.path(), "merged.gguf", &tiny_tensors(&cfg, false)).unwrap();
        let split = load(dir.path(), "split.gguf", &tiny_tensors(&cfg, true)).unwrap();
        assert!(split.file.tensor("blk.1.ffn_down.3.weight").is_some());
        assert_eq!(merged.config, cfg);
        let (a, b) = (merged.weights().unwrap(), split.weights().unwrap());
        assert_eq!(a.layers.len(), 2);
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            assert_eq!(la.experts.len(), 4);
            for (ea, eb) in la.experts.iter().zip(&lb.experts) {
                assert_eq!((ea.down.rows, ea.down.cols), (cfg.hidden_size, cfg.ffn_size));
                assert_eq!(ea.gate.data, eb.gate.data);
                assert_eq!(ea.up.data, eb.up.data);
                assert_eq!(ea.down.data, eb.down.data);
            }
            assert_eq!(la.attn_norm, lb.attn_norm);
        }
        // Experts are distinct slabs of the merged tensor, not the same bytes.
        assert_ne!(a.layers[0].experts[0].gate.data, a.layers[0].experts[1].gate.data);
        let mut row = vec![0.0; cfg.hidden_size];
        a.token_embd.dequantize_row(5, &mut row).unwrap();
        assert_eq!(bytemuck::cast_slice::<f32, u8>(&row), a.token_embd.row(5));
    }

    #[test]
    fn errors_name_the_tensor_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        let check = |name: &str, edit: &dyn Fn(&mut Vec<Tensor>), want: &[&str]| {
            let mut tensors = tiny_tensors(&cfg, false);
            edit(&mut tensors);
            let err = format!("{:#}", load(dir.path(), name, &tensors).err().expect("load must fail"));
            for w in want.iter().chain(&[name]) {
                assert!(err.contains(w), "{err:?} does not mention {w:?}");
            }
        };
        check(
            "missing.gguf",
            &|t| t.retain(|t| t.0 != "blk.1.attn_v.weight"),
            &["blk.1.attn_v.weight", "missing"],
        );
        check(
            "no_experts.gguf",
            &|t| t.retain(|t| t.0 != "blk.0.ffn_up_exps.weight"),
            &["blk.0.ffn_up_exps.weight", "blk.0.ffn_up.0.weight"],
        );
        check(
            "shape.gguf",
            &|t| {
                let q = t.iter_mut().find(|t| t.0 == "blk.0.attn_q.weight").unwrap();
                q.1 = vec![16, 64];
            },
            &["blk.0.attn_q.weight", "[16, 64]"],
        );
        check(
            "unsupported.gguf",
            &|t| {
                let o = t.iter_mut().find(|t| t.0 == "blk.0.attn_k.weight").unwrap();
                o.2 = GgmlType::Q8_1;
                o.1 = vec![32, 16];
                o.3 = vec![0; 16 * 36];
            },
            &["blk.0.attn_k.weight", "q8_1", "not supported"],
        );
    }

    #[test]
    fn matrix_checks_block_alignment_and_size() {
        let data = vec![0u8; 2 * 18];
        assert!(Matrix::new(GgmlType::Q4_0, 2, 32, &data).is_ok());
        assert!(Matrix::new(GgmlType::Q4_0, 1, 32, &data).is_err());
        let err = Matrix::new(GgmlType::Q4_K, 1, 32, &data).unwrap_err().to_string();
        assert!(err.contains("blocks"), "{err}");
        let err = Matrix::new(GgmlType::Q8_1, 1, 32, &[0u8; 36]).unwrap_err().to_string();
        assert!(err.contains("q8_1"), "{err}");
    }
}
