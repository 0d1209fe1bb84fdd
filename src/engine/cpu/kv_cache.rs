//! The f32 key/value cache: per layer, one `[position, kv_dim]` buffer for keys and one for values.
//! Buffers grow with the tokens actually cached, so a large `--ctx` costs nothing until it is used.

pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_dim: usize,
    capacity: usize,
    /// Tokens cached in every layer; layers hold more while a forward pass is in progress.
    len: usize,
}

#[derive(Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> KvCache {
        KvCache { layers: (0..n_layers).map(|_| LayerCache::default()).collect(), kv_dim, capacity, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends the keys and values (`[n, kv_dim]`) of new tokens to `layer`.
    pub fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        let l = &mut self.layers[layer];
        l.keys.extend_from_slice(keys);
        l.values.extend_from_slice(values);
    }

    /// Keys of `layer`, `[tokens, kv_dim]`, including tokens appended by the pass in progress.
    pub fn keys(&self, layer: usize) -> &[f32] {
        &self.layers[layer].keys
    }

    pub fn values(&self, layer: usize) -> &[f32] {
        &self.layers[layer].values
    }

    /// Marks `n` appended tokens as cached in every layer (end of a forward pass).
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.layers.iter().all(|l| l.keys.len() == self.len * self.kv_dim));
    }

    /// Keeps the first `n` tokens of every layer (and drops whatever an unfinished pass appended).
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
        for l in &mut self.layers {
            l.keys.truncate(self.len * self.kv_dim);
            l.values.truncate(self.len * self.kv_dim);
        }
    }
}
