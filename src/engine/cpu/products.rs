//! The products of the CPU backend with weight matrices: [`matvecs`] (one token, several products in
//! one parallel pass) and [`Input`] (many tokens, each input quantized once per weight type).

use anyhow::Result;
use rayon::prelude::*;

use super::dot;
use crate::format::GgmlType;
use crate::model::weights::Matrix;

/// `out[i] = w_i · x_i` for one token per product, all in one parallel pass (`dot::matvec_many`). Inputs
/// shared by several matrices of one weight type are quantized once.
pub fn matvecs(products: &[(&[f32], &Matrix)]) -> Result<Vec<Vec<f32>>> {
    let mut quantized: Vec<(&[f32], GgmlType, dot::QuantizedActivations)> = Vec::new();
    let mut which = Vec::with_capacity(products.len());
    for &(x, w) in products {
        let known = quantized.iter().position(|(qx, ty, _)| std::ptr::eq(*qx, x) && *ty == w.ty);
        which.push(match known {
            Some(i) => i,
            None => {
                quantized.push((x, w.ty, dot::QuantizedActivations::new(w.ty, x)?));
                quantized.len() - 1
            }
        });
    }
    let mut outs: Vec<Vec<f32>> = products.iter().map(|(_, w)| vec![0.0; w.rows]).collect();
    let mut jobs: Vec<dot::MatVec> = products
        .iter()
        .zip(&which)
        .zip(&mut outs)
        .map(|((&(_, w), &i), out)| dot::MatVec {
            ty: w.ty,
            w: w.data,
            rows: w.rows,
            cols: w.cols,
            x: &quantized[i].2,
            out,
        })
        .collect();
    dot::matvec_many(&mut jobs)?;
    Ok(outs)
}

/// Rows of activations (`[n, cols]`) on their way into weight matrices. They are quantized for a
/// matrix's type (in parallel, over tokens) the first time one needs it, and kept: the matrices that
/// read the same input (q, k and v; an expert's gate and up) share the quantization.
pub struct Input<'a> {
    xs: &'a [f32],
    quantized: Vec<(GgmlType, Vec<dot::QuantizedActivations>)>,
}

impl<'a> Input<'a> {
    pub fn new(xs: &'a [f32]) -> Input<'a> {
        Input { xs, quantized: Vec::new() }
    }

    /// `out[t, r] = Σ_c w[r, c] · xs[t, c]` for every row `t` (`[n, w.cols]` → `[n, w.rows]`). The one
    /// place the engine multiplies by a weight matrix: `dot` reads each weight row once for all tokens.
    pub fn matmul(&mut self, w: &Matrix, out: &mut [f32]) -> Result<()> {
        let known = self.quantized.iter().position(|(ty, _)| *ty == w.ty);
        let i = match known {
            Some(i) => i,
            None => {
                let acts = self
                    .xs
                    .par_chunks_exact(w.cols)
                    .map(|x| dot::QuantizedActivations::new(w.ty, x))
                    .collect::<Result<Vec<_>>>()?;
                self.quantized.push((w.ty, acts));
                self.quantized.len() - 1
            }
        };
        dot::matmul(w.ty, w.data, w.rows, w.cols, &self.quantized[i].1, out)
    }
}
