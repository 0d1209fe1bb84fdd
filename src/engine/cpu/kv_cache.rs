//! The f32 key/value cache: per layer and KV head, one `[position, head_dim]` buffer for keys and one for
//! values. Head-major, so that attention reads each head's keys and values as one sequential stream (with
//! `[position, kv_dim]` rows it read 512 of every 4096 bytes, and long-context decode waited on memory).
//! Buffers grow with the tokens actually cached, so a large `--ctx` costs nothing until it is used.
//! The transformer keeps the count of cached tokens; a layer holds more while a pass is in progress.

pub struct KvCache {
    /// `layers[l][h]`: keys and values of KV head h in layer l.
    layers: Vec<Vec<HeadCache>>,
    head_dim: usize,
}

#[derive(Default)]
pub struct HeadCache {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> KvCache {
        let layers = (0..n_layers).map(|_| (0..n_kv_heads).map(|_| HeadCache::default()).collect()).collect();
        KvCache { layers, head_dim }
    }

    /// Stores the keys and values (`[n, n_kv_heads * head_dim]`) of new tokens at positions `start ..`
    /// of `layer` (forgetting whatever that layer held from `start` on).
    pub fn append(&mut self, layer: usize, start: usize, keys: &[f32], values: &[f32]) {
        let hd = self.head_dim;
        let heads = &mut self.layers[layer];
        for head in heads.iter_mut() {
            head.keys.truncate(start * hd);
            head.values.truncate(start * hd);
            debug_assert_eq!(head.keys.len(), start * hd, "positions before {start} are missing");
        }
        for (k, v) in keys.chunks_exact(hd * heads.len()).zip(values.chunks_exact(hd * heads.len())) {
            for ((head, k), v) in heads.iter_mut().zip(k.chunks_exact(hd)).zip(v.chunks_exact(hd)) {
                head.keys.extend_from_slice(k);
                head.values.extend_from_slice(v);
            }
        }
    }

    /// The KV heads of `layer`, each `[tokens, head_dim]`, including tokens appended by the pass in
    /// progress.
    pub fn heads(&self, layer: usize) -> &[HeadCache] {
        &self.layers[layer]
    }

    /// Keeps the first `n` tokens of every layer.
    pub fn truncate(&mut self, n: usize) {
        for head in self.layers.iter_mut().flatten() {
            head.keys.truncate(n * self.head_dim);
            head.values.truncate(n * self.head_dim);
        }
    }
}
