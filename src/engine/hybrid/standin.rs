//! A stand-in "device" for machines without a GPU (CI): an expert executor on its own thread with a
//! fixed number of expert slots. Copying an expert into a slot is a memcpy of its quantized bytes
//! into buffers the executor owns; it computes the expert FFNs of the (token, expert) pairs sent to
//! it with the CPU backend's expert kernels, so its results are bit-for-bit the CPU's. It exercises
//! everything a real device scheduler needs (residency, copies, work running concurrently with the
//! host, results coming back) without a device.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam::channel::{unbounded, Receiver, Sender};

use super::policy::Key;
use crate::engine::cpu::{CpuBackend, CpuTensor, Routes};
use crate::engine::transformer::{Backend, ExpertInput, ExpertMatrix, Route};
use crate::model::weights::{ExpertWeights, Matrix};
use crate::model::ModelConfig;

/// An expert's matrices, copied: (type, rows, cols, bytes) of gate, up and down.
pub struct ExpertCopy {
    parts: [(crate::format::GgmlType, usize, usize, Vec<u8>); 3],
}

impl ExpertCopy {
    /// Copies `e`'s bytes (the host → device transfer).
    pub fn of(e: &ExpertWeights) -> ExpertCopy {
        let part = |m: &Matrix| (m.ty, m.rows, m.cols, m.data.to_vec());
        ExpertCopy { parts: [part(&e.gate), part(&e.up), part(&e.down)] }
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| p.3.len()).sum()
    }

    fn weights(&self) -> Result<ExpertWeights<'_>> {
        let m = |i: usize| {
            let (ty, rows, cols, data) = &self.parts[i];
            Matrix::new(*ty, *rows, *cols, data)
        };
        Ok(ExpertWeights { gate: m(0)?, up: m(1)?, down: m(2)? })
    }
}

/// One expert's share of a layer's work: its pairs as a route per token of the batch (empty for
/// tokens that do not use it, so the batch size, and with it the CPU's kernel choice, is the same).
pub struct Job {
    pub key: Key,
    pub per_token: Vec<Route>,
}

enum Request {
    /// Holds `copy` in a slot as `key`, after dropping every slot not in `keep`.
    Load { key: Key, copy: ExpertCopy, keep: Vec<Key> },
    /// Runs `jobs` on the rows `x`; answers one `[pairs, hidden]` output per job.
    Run { x: Arc<CpuTensor>, jobs: Vec<Job>, reply: Sender<Result<Vec<CpuTensor>>> },
}

/// The handle to the executor thread; dropping it stops the thread.
pub struct StandIn {
    requests: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    capacity: usize,
}

impl StandIn {
    /// An executor with `capacity` expert slots for a model of shapes `cfg`.
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Result<StandIn> {
        let (tx, rx) = unbounded();
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("standin-device".into())
            .spawn(move || serve(&cfg, capacity, &rx))
            .context("starting the stand-in device thread")?;
        Ok(StandIn { requests: Some(tx), thread: Some(thread), capacity })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn send(&self, r: Request) -> Result<()> {
        let tx = self.requests.as_ref().ok_or_else(|| anyhow!("the stand-in device is stopped"))?;
        tx.send(r).map_err(|_| anyhow!("the stand-in device thread has stopped"))
    }

    /// Queues a copy of an expert into a slot, keeping only `keep` (plus it) resident.
    pub fn load(&self, key: Key, copy: ExpertCopy, keep: Vec<Key>) -> Result<()> {
        self.send(Request::Load { key, copy, keep })
    }

    /// Starts `jobs` on the executor; the receiver yields their outputs in job order.
    pub fn run(&self, x: Arc<CpuTensor>, jobs: Vec<Job>) -> Result<Receiver<Result<Vec<CpuTensor>>>> {
        let (reply, rx) = crossbeam::channel::bounded(1);
        self.send(Request::Run { x, jobs, reply })?;
        Ok(rx)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The executor loop: requests in order, so a load queued before a run is resident for it.
fn serve(cfg: &ModelConfig, capacity: usize, rx: &Receiver<Request>) {
    // Its own thread pool: the caller waits for the reply on a worker of the global pool, so kernels
    // queued there could wait behind it forever (seen: a hang with rayon's 2 threads on 2 cores).
    let pool = match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "standin-kernels".into())
        .build()
    {
        Ok(pool) => pool,
        Err(e) => {
            for request in rx {
                if let Request::Run { reply, .. } = request {
                    let _ = reply.send(Err(anyhow!("the stand-in device has no thread pool: {e}")));
                }
            }
            return;
        }
    };
    let mut slots: HashMap<Key, ExpertCopy> = HashMap::new();
    for request in rx {
        match request {
            Request::Load { key, copy, keep } => {
                slots.retain(|k, _| keep.contains(k));
                if slots.len() < capacity {
                    slots.insert(key, copy);
                }
            }
            Request::Run { x, jobs, reply } => {
                let out = pool.install(|| jobs.iter().map(|job| run_job(cfg, &slots, &x, job)).collect());
                let _ = reply.send(out);
            }
        }
    }
}

/// One expert's pairs: `down(silu(gate x) * up x)` with the CPU kernels, the expert as id 0.
fn run_job(
    cfg: &ModelConfig,
    slots: &HashMap<Key, ExpertCopy>,
    x: &CpuTensor,
    job: &Job,
) -> Result<CpuTensor> {
    let Some(copy) = slots.get(&job.key) else {
        bail!("expert {} of layer {} is not in a stand-in slot", job.key.1, job.key.0)
    };
    let experts = vec![copy.weights()?];
    // A backend per job: its expert handles borrow this slot's buffers (cheap: shapes and a RoPE table).
    let mut cpu = CpuBackend::new(cfg);
    let routes = Routes::new(job.per_token.clone(), 1);
    let h = cpu.expert_swiglu(&experts, x, &routes)?;
    let [y] = cpu.expert_matmul(&experts, [ExpertMatrix::Down], &h, ExpertInput::Pairs, &routes)?;
    Ok(y)
}
