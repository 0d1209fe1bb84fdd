//! The q/k row permutation of llama.cpp's converter.
//!
//! Hugging Face checkpoints rotate (i, i + head_dim/2) pairs in RoPE ("rotate_half"); llama.cpp
//! rotates adjacent pairs (2i, 2i+1). Its converter reorders the rows of q and k per head
//! (`w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2)`), and so do we, so that GGUF files from both
//! tools are interchangeable.

/// The source row that GGUF row `row` comes from, for a matrix of `n_heads` heads of `head_dim` rows.
pub fn source_row(row: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (head, within) = (row / head_dim, row % head_dim);
    let (i, j) = (within / 2, within % 2);
    head * head_dim + j * half + i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_converters_reshape_swapaxes() {
        // head_dim 4: rows per head [a0 a1 b0 b1] (a = first half, b = second half) become [a0 b0 a1 b1].
        let order: Vec<usize> = (0..8).map(|r| source_row(r, 4)).collect();
        assert_eq!(order, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn is_a_permutation() {
        let mut seen: Vec<usize> = (0..256).map(|r| source_row(r, 128)).collect();
        seen.sort();
        assert_eq!(seen, (0..256).collect::<Vec<_>>());
    }
}
