//! The model's weights as one backend holds them: the host weights of the mapped file, each matrix
//! turned into the backend's handle at load ([`Prepare`]), arranged by the layer specs.

use anyhow::{bail, Context, Result};

use super::backend::{Backend, Prepare};
use crate::model::spec::{FfnSpec, Gating};
use crate::model::weights::ModelWeights;
use crate::model::ModelConfig;

pub struct Weights<B: Backend> {
    /// `[vocab, hidden]`.
    pub token_embd: B::Matrix,
    pub layers: Vec<Layer<B>>,
    pub output_norm: B::Vector,
    /// `[vocab, hidden]`.
    pub output: B::Matrix,
}

pub struct Layer<B: Backend> {
    pub attn_norm: B::Vector,
    pub attn_q: B::Matrix,
    pub attn_k: B::Matrix,
    pub attn_v: B::Matrix,
    pub attn_output: B::Matrix,
    pub ffn_norm: B::Vector,
    pub ffn: Ffn<B>,
}

/// The feed-forward part of a layer (see [`FfnSpec`]).
pub enum Ffn<B: Backend> {
    Dense(FfnWeights<B>),
    Moe(Moe<B>),
}

/// One SwiGLU FFN: `down(silu(gate x) * up x)`.
pub struct FfnWeights<B: Backend> {
    /// `[ffn, hidden]`.
    pub gate: B::Matrix,
    /// `[ffn, hidden]`.
    pub up: B::Matrix,
    /// `[hidden, ffn]`.
    pub down: B::Matrix,
}

pub struct Moe<B: Backend> {
    /// `[n_experts, hidden]`.
    pub router: B::Matrix,
    pub experts: B::Experts,
    /// Shared experts: every token goes through them (weight 1).
    pub shared: Option<FfnWeights<B>>,
    pub top_k: usize,
    pub gating: Gating,
}

impl<B: Backend> Weights<B> {
    /// The backend's handles for `host`, laid out as `cfg`'s layer specs say.
    pub fn prepare<'w>(backend: &mut B, host: &ModelWeights<'w>, cfg: &ModelConfig) -> Result<Weights<B>>
    where
        B: Prepare<'w>,
    {
        let layers = host
            .layers
            .iter()
            .enumerate()
            .map(|(l, w)| {
                let name = |what: &str| format!("layer {l}: preparing {what}");
                let attn_norm = backend.vector(&w.attn_norm).with_context(|| name("the attention norm"))?;
                let ffn = match cfg.layer(l).ffn {
                    FfnSpec::Moe(spec) if spec.shared_ffn_size.is_none() => Ffn::Moe(Moe {
                        router: backend.matrix(&w.router).with_context(|| name("the router"))?,
                        experts: backend.experts(l, &w.experts).with_context(|| name("the experts"))?,
                        shared: None,
                        top_k: spec.top_k,
                        gating: spec.gating,
                    }),
                    other => {
                        bail!("layer {l}: the host weights hold a Mixtral layer, the spec says {other:?}")
                    }
                };
                Ok(Layer {
                    attn_norm,
                    attn_q: backend.matrix(&w.attn_q).with_context(|| name("attn_q"))?,
                    attn_k: backend.matrix(&w.attn_k).with_context(|| name("attn_k"))?,
                    attn_v: backend.matrix(&w.attn_v).with_context(|| name("attn_v"))?,
                    attn_output: backend.matrix(&w.attn_output).with_context(|| name("attn_output"))?,
                    ffn_norm: backend.vector(&w.ffn_norm).with_context(|| name("the FFN norm"))?,
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            token_embd: backend.matrix(&host.token_embd).context("preparing the token embeddings")?,
            layers,
            output_norm: backend.vector(&host.output_norm).context("preparing the output norm")?,
            output: backend.matrix(&host.output).context("preparing the output head")?,
        })
    }
}
