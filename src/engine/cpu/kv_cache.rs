//! The f32 key/value cache: per layer and KV head, one `[position, head_dim]` buffer for keys and one for
//! values. Head-major, so that attention reads each head's keys and values as one sequential stream (with
//! `[position, kv_dim]` rows it read 512 of every 4096 bytes, and long-context decode waited on memory).
//! Buffers grow with the tokens actually cached, so a large `--ctx` costs nothing until it is used.

pub struct KvCache {
    /// `layers[l][h]`: keys and values of KV head h in layer l.
    layers: Vec<Vec<HeadCache>>,
    head_dim: usize,
    capacity: usize,
    /// Tokens cached in every layer; layers hold more while a forward pass is in progress.
    len: usize,
}

#[derive(Default)]
pub struct HeadCache {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> KvCache {
        let layers = (0..n_layers).map(|_| (0..n_kv_heads).map(|_| HeadCache::default()).collect()).collect();
        KvCache { layers, head_dim, capacity, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends the keys and values (`[n, n_kv_heads * head_dim]`) of new tokens to `layer`.
    pub fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let hd = self.head_dim;
        let heads = &mut self.layers[layer];
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

    /// Marks `n` appended tokens as cached in every layer (end of a forward pass).
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.layers.iter().flatten().all(|h| h.keys.len() == self.len * self.head_dim));
    }

    /// Keeps the first `n` tokens of every layer (and drops whatever an unfinished pass appended).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        for head in self.layers.iter_mut().flatten() {
            head.keys.truncate(self.len * self.head_dim);
            head.values.truncate(self.len * self.head_dim);
        }
    }
}
