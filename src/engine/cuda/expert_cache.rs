//! VRAM slots for the experts the placement plan left in host memory: an expert is copied into a slot
//! when it is to run on the GPU and stays there until its slot is needed for another: the least
//! frequently used expert's (the least recently used among equals).
//! Copies are staged through pinned host buffers (page-locked memory is what lets the GPU's copy
//! engine read at full PCIe speed) and run on the copy stream. Ordering is by explicit events:
//! - a slot is overwritten only after the compute work queued before (which may read it) has run;
//! - the compute stream waits for the copies before what it runs next;
//! - a staging buffer is refilled only after the copy that read it last has run (one event per buffer).

use anyhow::{bail, ensure, Context, Result};

use super::device::{DeviceBuffer, Event, PinnedBuffer, Stream};
use super::ops::{Gpu, WeightView};
use crate::format::GgmlType;
use crate::model::weights::ExpertWeights;
use crate::placement::ExpertLayout;

/// (layer, expert).
pub type ExpertKey = (usize, usize);

/// Outcome of [`SlotLfu::get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The expert is already in this slot.
    Hit(usize),
    /// The expert now owns this slot and must be copied into it; `evicted` was there before.
    Miss { slot: usize, evicted: Option<ExpertKey> },
}

/// Bookkeeping of the slots (no GPU involved). An expert that must run on the GPU always takes a slot;
/// the one it takes is the least frequently used expert's, counting every use since the start, the
/// least recently used among equals. On the demo model's routing (decode order, 32 experts) it hits
/// 19.6 / 44.2 / 73.9% with 4 / 8 / 16 slots where LRU hits 0.0 / 33.4 / 63.2% (`hybrid::policy`'s
/// trace test, where it runs beside the other policies).
#[derive(Debug)]
pub struct SlotLfu {
    slots: Vec<Option<ExpertKey>>,
    last_use: Vec<u64>,
    /// Uses of every expert seen, resident or not.
    uses: std::collections::HashMap<ExpertKey, u64>,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl SlotLfu {
    pub fn new(n_slots: usize) -> SlotLfu {
        SlotLfu {
            slots: vec![None; n_slots],
            last_use: vec![0; n_slots],
            uses: Default::default(),
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The slot of `key`, or a slot (empty ones first, then the least frequently and least recently
    /// used) whose expert is not in `keep` (the other experts the current step needs), now assigned
    /// to `key`.
    pub fn get(&mut self, key: ExpertKey, keep: &[ExpertKey]) -> Result<Lookup> {
        self.clock += 1;
        *self.uses.entry(key).or_default() += 1;
        if let Some(slot) = self.slots.iter().position(|s| *s == Some(key)) {
            self.last_use[slot] = self.clock;
            self.hits += 1;
            return Ok(Lookup::Hit(slot));
        }
        let uses = |s: usize| self.slots[s].map_or(0, |k| self.uses.get(&k).copied().unwrap_or(0));
        let victim = (0..self.slots.len())
            .filter(|&s| self.slots[s].is_none_or(|k| !keep.contains(&k)))
            .min_by_key(|&s| (self.slots[s].is_some(), uses(s), self.last_use[s]));
        let Some(slot) = victim else {
            bail!("all {} expert slots hold experts needed by the same step", self.slots.len());
        };
        let evicted = self.slots[slot].replace(key);
        self.last_use[slot] = self.clock;
        self.misses += 1;
        Ok(Lookup::Miss { slot, evicted })
    }

    /// Empties `slot` (its copy failed, so its contents are not `key`'s).
    pub fn forget(&mut self, slot: usize) {
        self.slots[slot] = None;
    }

    pub fn hits(&self) -> u64 {
        self.hits
    }

    pub fn misses(&self) -> u64 {
        self.misses
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The slot bookkeeping as a residency policy, for the trace simulator.
impl crate::engine::hybrid::policy::Policy for SlotLfu {
    fn name(&self) -> &'static str {
        "gpu slots"
    }

    fn access(&mut self, key: ExpertKey) -> crate::engine::hybrid::policy::Access {
        use crate::engine::hybrid::policy::Access;
        match self.get(key, &[]) {
            Ok(Lookup::Hit(_)) => Access::Hit,
            // Without slots an expert cannot run on the GPU: the host runs it.
            Ok(Lookup::Miss { .. }) => Access::Load,
            Err(_) => Access::Host,
        }
    }

    fn resident(&self) -> Vec<ExpertKey> {
        self.slots.iter().flatten().copied().collect()
    }
}

/// A pinned buffer and the event recorded after the last copy that read it.
struct Staging {
    buf: PinnedBuffer,
    read: Event,
}

/// The slots on the device and the pinned buffers their copies go through.
pub struct ExpertCache {
    slots: Vec<DeviceBuffer<u8>>,
    staging: Vec<Staging>,
    /// Recorded on the compute stream before slots are overwritten.
    compute_done: Event,
    /// Recorded on the copy stream after a step's copies.
    copies_done: Event,
    book: SlotLfu,
    bytes_copied: u64,
    /// Copies a prefetch started that the compute stream has not been told to wait for yet.
    copies_pending: bool,
}

impl ExpertCache {
    /// `n_slots` slots of `slot_bytes` bytes and `n_staging` pinned buffers (one per expert a step may
    /// copy at once, so that the second copy does not wait for the first).
    pub fn new(gpu: &Gpu, n_slots: usize, slot_bytes: usize, n_staging: usize) -> Result<ExpertCache> {
        let slots = (0..n_slots)
            .map(|_| gpu.alloc_zeros::<u8>(slot_bytes))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("allocating {n_slots} expert slots of {slot_bytes} bytes in VRAM"))?;
        let staging = (0..n_staging.max(1))
            .map(|_| Ok(Staging { buf: gpu.pinned(slot_bytes)?, read: gpu.event()? }))
            .collect::<Result<Vec<_>>>()
            .with_context(|| {
                format!("allocating {n_staging} pinned staging buffers of {slot_bytes} bytes")
            })?;
        Ok(ExpertCache {
            slots,
            staging,
            compute_done: gpu.event()?,
            copies_done: gpu.event()?,
            book: SlotLfu::new(n_slots),
            bytes_copied: 0,
            copies_pending: false,
        })
    }

    /// Makes experts `ids` of `layer` available in slots and returns each one's slot. Missing experts
    /// are copied on the copy stream; the compute stream waits for the copies before what it runs next
    /// or, for a `prefetch`, before what it runs after the next fetch (so the work queued in between,
    /// the next layer's attention, overlaps the copies).
    pub fn fetch(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        ids: &[usize],
        experts: &[ExpertWeights],
        prefetch: bool,
    ) -> Result<Vec<usize>> {
        let keep: Vec<ExpertKey> = ids.iter().map(|&e| (layer, e)).collect();
        // Slots about to be overwritten may still be read by queued kernels.
        self.compute_done.record(Stream::Compute)?;
        self.compute_done.wait(Stream::Copy)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut copied = false;
        for (i, &e) in ids.iter().enumerate() {
            let slot = match self.book.get((layer, e), &keep)? {
                Lookup::Hit(slot) => slot,
                Lookup::Miss { slot, .. } => {
                    let staging = i % self.staging.len();
                    if let Err(err) = self.copy(gpu, staging, slot, &experts[e]) {
                        self.book.forget(slot);
                        return Err(err.context(format!("copying expert {e} of layer {layer} to the GPU")));
                    }
                    copied = true;
                    slot
                }
            };
            out.push(slot);
        }
        if copied {
            self.copies_done.record(Stream::Copy)?;
        }
        if prefetch {
            self.copies_pending |= copied;
        } else if copied || self.copies_pending {
            self.copies_done.wait(Stream::Compute)?;
            self.copies_pending = false;
        }
        Ok(out)
    }

    fn copy(&mut self, gpu: &Gpu, staging: usize, slot: usize, expert: &ExpertWeights) -> Result<()> {
        let layout = ExpertLayout::of(expert);
        ensure!(
            layout.bytes <= self.slots[slot].len(),
            "expert of {} bytes exceeds the slot size",
            layout.bytes
        );
        let Staging { buf, read } = &mut self.staging[staging];
        // The previous copy out of this buffer must have read it before it is refilled.
        read.synchronize()?;
        let host = buf.as_mut_slice();
        for (m, off) in [expert.gate, expert.up, expert.down].iter().zip(layout.offsets) {
            host[off..off + m.data.len()].copy_from_slice(m.data);
        }
        // Buffer and slot have the same size.
        gpu.copy_pinned(Stream::Copy, buf, &mut self.slots[slot].view_mut())?;
        read.record(Stream::Copy)?;
        self.bytes_copied += buf.len() as u64;
        Ok(())
    }

    /// Host-to-device speed of a slot's copy from pinned memory, in bytes per second: the second of
    /// two timed copies (the first one pays for first-touch costs). Overwrites slot 0, so it is
    /// measured before any expert is fetched.
    pub fn measure_copy(&mut self, gpu: &Gpu) -> Result<f64> {
        ensure!(
            self.book.hits() + self.book.misses() == 0,
            "the copy speed is measured before slots are used"
        );
        let Staging { buf, read } = &mut self.staging[0];
        let mut seconds = f64::INFINITY;
        for _ in 0..2 {
            let t = std::time::Instant::now();
            gpu.copy_pinned(Stream::Copy, buf, &mut self.slots[0].view_mut())?;
            read.record(Stream::Copy)?;
            read.synchronize()?;
            seconds = t.elapsed().as_secs_f64();
        }
        Ok(buf.len() as f64 / seconds.max(1e-9))
    }

    /// The device's read speed in the matrix-vector kernel, in bytes per second: a `rows x cols`
    /// matrix of `ty` read from slot 0 (whatever it holds), timed after one untimed launch (which
    /// also loads the kernel).
    pub fn measure_read(&mut self, gpu: &Gpu, ty: GgmlType, rows: usize, cols: usize) -> Result<f64> {
        let bytes = rows * ty.bytes_for(cols).context("a matrix of whole blocks")?;
        ensure!(bytes <= self.slots[0].len(), "a {rows}x{cols} {ty} matrix is larger than a slot");
        let x = gpu.alloc_zeros::<f32>(cols)?;
        let mut y = gpu.alloc_zeros::<f32>(rows)?;
        let w = WeightView { ty, rows, cols, data: self.slots[0].slice(..bytes) };
        gpu.matvec(&w, &x.view(), &mut y.view_mut())?;
        gpu.sync()?;
        const RUNS: usize = 3;
        let t = std::time::Instant::now();
        for _ in 0..RUNS {
            gpu.matvec(&w, &x.view(), &mut y.view_mut())?;
        }
        gpu.sync()?;
        Ok((RUNS * bytes) as f64 / t.elapsed().as_secs_f64().max(1e-9))
    }

    /// Experts copied so far, and their bytes.
    pub fn copies(&self) -> (u64, u64) {
        (self.book.misses(), self.bytes_copied)
    }

    pub fn slot(&self, slot: usize) -> &DeviceBuffer<u8> {
        &self.slots[slot]
    }

    pub fn stats(&self) -> String {
        let (h, m) = (self.book.hits(), self.book.misses());
        let rate = if h + m == 0 { 0.0 } else { 100.0 * h as f64 / (h + m) as f64 };
        format!(
            "expert cache: {} slots, {h} hits, {m} misses ({rate:.1}% hits), {:.2} GiB copied",
            self.book.len(),
            self.bytes_copied as f64 / (1u64 << 30) as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_frequently_used_expert_is_evicted_the_least_recent_among_equals() {
        let mut book = SlotLfu::new(2);
        book.get((0, 1), &[]).unwrap();
        book.get((0, 1), &[]).unwrap();
        book.get((0, 2), &[]).unwrap();
        // (0, 1) was used twice: (0, 2) goes, although (0, 1) is the least recently used.
        assert_eq!(book.get((0, 3), &[]).unwrap(), Lookup::Miss { slot: 1, evicted: Some((0, 2)) });
        assert_eq!(book.get((0, 1), &[]).unwrap(), Lookup::Hit(0));
    }

    #[test]
    fn hits_misses_and_eviction_order() {
        let mut book = SlotLfu::new(3);
        assert_eq!(book.get((0, 1), &[]).unwrap(), Lookup::Miss { slot: 0, evicted: None });
        assert_eq!(book.get((0, 2), &[]).unwrap(), Lookup::Miss { slot: 1, evicted: None });
        assert_eq!(book.get((1, 5), &[]).unwrap(), Lookup::Miss { slot: 2, evicted: None });
        assert_eq!(book.get((0, 1), &[]).unwrap(), Lookup::Hit(0));
        // (0, 2) is now the least recently used.
        assert_eq!(book.get((2, 0), &[]).unwrap(), Lookup::Miss { slot: 1, evicted: Some((0, 2)) });
        assert_eq!(book.get((1, 5), &[]).unwrap(), Lookup::Hit(2));
        // (0, 1) and (1, 5) were used twice, (2, 0) once: it goes.
        assert_eq!(book.get((0, 2), &[]).unwrap(), Lookup::Miss { slot: 1, evicted: Some((2, 0)) });
        assert_eq!((book.hits(), book.misses()), (2, 5));
    }

    #[test]
    fn experts_of_the_current_step_are_never_evicted() {
        let mut book = SlotLfu::new(2);
        book.get((3, 0), &[]).unwrap();
        book.get((3, 1), &[]).unwrap();
        // (3, 0) is least recently used but kept: (3, 1)'s slot goes instead.
        let got = book.get((4, 7), &[(3, 0), (4, 7)]).unwrap();
        assert_eq!(got, Lookup::Miss { slot: 1, evicted: Some((3, 1)) });
        let err = book.get((5, 5), &[(3, 0), (4, 7)]).unwrap_err().to_string();
        assert!(err.contains("slots"), "{err}");
    }

    #[test]
    fn a_forgotten_slot_is_reused_first() {
        let mut book = SlotLfu::new(2);
        book.get((0, 0), &[]).unwrap();
        book.get((0, 1), &[]).unwrap();
        book.get((0, 0), &[]).unwrap();
        book.forget(0);
        assert_eq!(book.get((1, 1), &[]).unwrap(), Lookup::Miss { slot: 0, evicted: None });
        assert_eq!(book.get((0, 0), &[]).unwrap(), Lookup::Miss { slot: 1, evicted: Some((0, 1)) });
    }
}
