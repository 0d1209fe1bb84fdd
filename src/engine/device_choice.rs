//! Where the forward pass runs (what `--device` accepts): `auto` (CUDA device 0 when CUDA works,
//! else the CPU), `cpu`, `cuda` (device 0) or `cuda:N`, and `standin:N` (the CPU with a stand-in
//! for a GPU of N expert slots: the hybrid expert scheduler without a GPU, for tests and its stats); and byte counts as `--vram-budget` takes
//! them, with an optional K/M/G/T suffix (binary units: `24G` = 24 GiB).

use std::str::FromStr;

use anyhow::{bail, Context, Result};

use super::cuda;
use crate::Error;

/// Where the forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
    /// The hybrid scheduler over a stand-in device with this many expert slots.
    StandIn(usize),
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<DeviceChoice> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda(0),
            _ => match (s.strip_prefix("cuda:"), s.strip_prefix("standin:")) {
                (Some(n), _) => {
                    DeviceChoice::Cuda(n.parse().with_context(|| format!("bad CUDA device number in {s:?}"))?)
                }
                (_, Some(n)) => {
                    DeviceChoice::StandIn(n.parse().with_context(|| format!("bad number of slots in {s:?}"))?)
                }
                _ => bail!("unknown device {s:?}: expected auto, cpu, cuda, cuda:N or standin:N"),
            },
        })
    }
}

impl DeviceChoice {
    /// The CUDA device to use, or `None` for the CPU. `Auto` falls back to the CPU when CUDA cannot
    /// be used and returns the reason alongside (for `--verbose`); an explicit `cuda` that cannot be
    /// used is an [`Error::NoGpu`].
    pub fn resolve(self) -> Result<(Option<usize>, Option<String>)> {
        match self {
            DeviceChoice::Cpu | DeviceChoice::StandIn(_) => Ok((None, None)),
            DeviceChoice::Cuda(n) => match cuda::device_info(n) {
                Ok(_) => Ok((Some(n), None)),
                Err(e) => Err(Error::NoGpu(format!("{e:#}")).into()),
            },
            DeviceChoice::Auto => match cuda::cuda_available() {
                Ok(info) => Ok((Some(info.ordinal), None)),
                Err(e) => Ok((None, Some(format!("using the CPU: {e:#}")))),
            },
        }
    }
}

/// Parses a byte count: `123`, `512M`, `24G`, `1.5T` (binary units; a trailing `B`/`iB` is accepted).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let t = t.strip_suffix("IB").or_else(|| t.strip_suffix('B')).unwrap_or(&t);
    let (num, shift) = match t.chars().last() {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 =
        num.trim().parse().with_context(|| format!("bad size {s:?}: expected e.g. 24G or 22000M"))?;
    if !(value.is_finite() && value >= 0.0) {
        bail!("bad size {s:?}");
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("gpu".parse::<DeviceChoice>().unwrap_err().to_string().contains("cuda:N"));
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), (None, None));
        // Auto never fails: a device, or the CPU with the reason.
        let (device, why) = DeviceChoice::Auto.resolve().unwrap();
        assert!(device.is_some() != why.is_some());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("24G").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5T").unwrap(), 3 << 39);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1G").is_err());
    }
}
