//! Recycled device buffers for the backend's activations: ops return fresh tensors (the backend
//! contract), and allocating device memory per op would cost a driver call each (and `cuMemFree`
//! synchronizes). A buffer goes back to the pool when its tensor drops and is handed out again for a
//! request of the same size class, so decode allocates nothing after its first step.
//!
//! Reuse is safe without events: every activation is read and written on the compute stream only, so
//! a kernel queued after a buffer's reuse runs after the kernels that read its previous contents.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytemuck::Pod;

use super::device::{BufView, BufViewMut, Device, DeviceBuffer, Stream};

/// Free buffers by size class, oldest first, and the bytes they hold.
struct Free {
    bufs: Vec<DeviceBuffer<u8>>,
    bytes: u64,
    /// Free bytes kept at most; beyond this the oldest free buffers are released to the device.
    limit: u64,
}

/// The pool of one backend.
#[derive(Clone)]
pub struct Pool {
    dev: Arc<dyn Device>,
    free: Arc<Mutex<Free>>,
}

impl Pool {
    /// A pool that keeps up to `limit` bytes of free buffers (the activation bytes the plan reserved).
    pub fn new(dev: Arc<dyn Device>, limit: u64) -> Pool {
        Pool { dev, free: Arc::new(Mutex::new(Free { bufs: Vec::new(), bytes: 0, limit })) }
    }

    /// Room for `len` values, contents unspecified.
    pub fn take<T: Pod>(&self, len: usize) -> Result<Pooled<T>> {
        let bytes = size_class(len.max(1) * std::mem::size_of::<T>());
        let reused = {
            let mut free = self.lock();
            let found = free.bufs.iter().position(|b| b.len() == bytes);
            found.map(|i| {
                free.bytes -= bytes as u64;
                free.bufs.remove(i)
            })
        };
        let buf = match reused {
            Some(buf) => buf,
            None => match DeviceBuffer::<u8>::alloc(&self.dev, bytes) {
                Ok(buf) => buf,
                // Free buffers of other sizes may be what fills the device: release them and retry.
                Err(_) => {
                    self.release_all();
                    DeviceBuffer::<u8>::alloc(&self.dev, bytes).with_context(|| {
                        format!("allocating activations ({bytes} bytes) on {}", self.dev.info().name)
                    })?
                }
            },
        };
        Ok(Pooled { buf: Some(buf.cast()), len, pool: self.clone() })
    }

    /// `len` zeros.
    pub fn zeros<T: Pod>(&self, len: usize) -> Result<Pooled<T>> {
        let buf = self.take::<T>(len)?;
        // SAFETY: the range is the buffer's own allocation.
        unsafe { self.dev.memset(Stream::Compute, buf.address(), 0, len * std::mem::size_of::<T>()) }?;
        Ok(buf)
    }

    fn release_all(&self) {
        let mut free = self.lock();
        free.bufs.clear();
        free.bytes = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // A panic while holding the lock leaves the list consistent (it only pushes and removes).
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn give_back(&self, buf: DeviceBuffer<u8>) {
        let mut free = self.lock();
        free.bytes += buf.len() as u64;
        free.bufs.push(buf);
        while free.bytes > free.limit && !free.bufs.is_empty() {
            let oldest = free.bufs.remove(0);
            free.bytes -= oldest.len() as u64;
        }
    }
}

/// Sizes are rounded up to 256 bytes and to one of 8 steps per power of two, so that prompts of
/// similar lengths share buffers (at most 12.5% unused).
fn size_class(bytes: usize) -> usize {
    let bytes = bytes.next_multiple_of(256);
    let top = usize::BITS - 1 - bytes.leading_zeros();
    if top < 11 {
        return bytes;
    }
    let step = 1usize << (top - 3);
    bytes.next_multiple_of(step)
}

/// A buffer of the pool holding `len` values of `T`; back to the pool on drop.
pub struct Pooled<T: Pod> {
    buf: Option<DeviceBuffer<T>>,
    len: usize,
    pool: Pool,
}

impl<T: Pod> Pooled<T> {
    fn buffer(&self) -> &DeviceBuffer<T> {
        self.buf.as_ref().expect("present until dropped")
    }

    pub fn address(&self) -> u64 {
        self.buffer().address()
    }

    /// The `len` values (the allocation may be larger).
    pub fn view(&self) -> BufView<'_, T> {
        self.buffer().slice(..self.len)
    }

    pub fn view_mut(&mut self) -> BufViewMut<'_, T> {
        let len = self.len;
        self.buf.as_mut().expect("present until dropped").slice_mut(..len)
    }
}

impl<T: Pod> Drop for Pooled<T> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf.cast());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_an_eighth() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(256), 256);
        assert_eq!(size_class(1000), 1024);
        for bytes in [3000, 65_537, 1 << 20, 5_000_000, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes && (c - bytes) * 8 <= bytes + 2048, "{bytes} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }
}
