//! Where an engine's experts ran: the counters an expert scheduler keeps, reported by `--verbose`,
//! `bench -o json` and the server's `/stats`.

use std::fmt;

use serde::Serialize;

/// Counts since the engine was made. An "expert run" is one (layer, expert) group of a forward call:
/// one expert's weights applied to the tokens routed to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExpertStats {
    /// Tokens through the model (every forward call's tokens).
    pub tokens: u64,
    /// Expert runs on the device from a resident expert or a slot, and on the host.
    pub device: u64,
    pub host: u64,
    /// Experts copied to the device, and their bytes.
    pub copies: u64,
    pub bytes_copied: u64,
    /// Lookahead: experts actually used in the layers a prediction was made for, and how many of
    /// them had been predicted.
    pub lookahead_used: u64,
    pub lookahead_predicted: u64,
}

impl ExpertStats {
    /// Share of expert runs that found their expert on the device without a copy.
    pub fn hit_rate(&self) -> f64 {
        let runs = self.device + self.host;
        if runs == 0 {
            0.0
        } else {
            self.device.saturating_sub(self.copies) as f64 / runs as f64
        }
    }

    /// Share of the experts used that the lookahead predicted (None: no prediction was made).
    pub fn lookahead_recall(&self) -> Option<f64> {
        (self.lookahead_used > 0).then(|| self.lookahead_predicted as f64 / self.lookahead_used as f64)
    }

    /// `n` per token through the model (0 before any token).
    fn per_token(&self, n: u64) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            n as f64 / self.tokens as f64
        }
    }

    /// The counts added since `earlier` (the same engine's stats at an earlier time).
    pub fn since(&self, earlier: &ExpertStats) -> ExpertStats {
        ExpertStats {
            tokens: self.tokens - earlier.tokens,
            device: self.device - earlier.device,
            host: self.host - earlier.host,
            copies: self.copies - earlier.copies,
            bytes_copied: self.bytes_copied - earlier.bytes_copied,
            lookahead_used: self.lookahead_used - earlier.lookahead_used,
            lookahead_predicted: self.lookahead_predicted - earlier.lookahead_predicted,
        }
    }

    /// The counters with the per-token and rate figures, for JSON reports.
    pub fn to_json(&self) -> serde_json::Value {
        let per_token = |n| self.per_token(n);
        serde_json::json!({
            "tokens": self.tokens,
            "experts_on_device": self.device,
            "experts_on_host": self.host,
            "experts_copied": self.copies,
            "bytes_copied": self.bytes_copied,
            "per_token": {
                "experts_on_device": per_token(self.device),
                "experts_on_host": per_token(self.host),
                "experts_copied": per_token(self.copies),
                "bytes_copied": per_token(self.bytes_copied),
            },
            "hit_rate": self.hit_rate(),
            "lookahead_recall": self.lookahead_recall(),
        })
    }
}

impl fmt::Display for ExpertStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_token = |n| self.per_token(n);
        write!(
            f,
            "experts per token: {:.2} on the device, {:.2} on the host, {:.2} copied ({:.2} MB); hit rate {:.1}%",
            per_token(self.device),
            per_token(self.host),
            per_token(self.copies),
            per_token(self.bytes_copied) / 1e6,
            100.0 * self.hit_rate()
        )?;
        if let Some(r) = self.lookahead_recall() {
            write!(f, "; lookahead recall {:.1}%", 100.0 * r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_per_token_figures() {
        let s = ExpertStats {
            tokens: 4,
            device: 6,
            host: 2,
            copies: 2,
            bytes_copied: 8_000_000,
            lookahead_used: 8,
            lookahead_predicted: 6,
        };
        assert_eq!(s.hit_rate(), 0.5);
        assert_eq!(s.lookahead_recall(), Some(0.75));
        let text = s.to_string();
        assert!(text.contains("1.50 on the device, 0.50 on the host, 0.50 copied (2.00 MB)"), "{text}");
        assert!(text.contains("hit rate 50.0%; lookahead recall 75.0%"), "{text}");
        let j = s.to_json();
        assert_eq!(j["per_token"]["experts_on_device"], 1.5);
        assert_eq!(ExpertStats::default().lookahead_recall(), None);
        assert_eq!(s.since(&s), ExpertStats::default());
        assert_eq!(s.since(&ExpertStats::default()), s);
        assert_eq!(ExpertStats::default().to_json()["lookahead_recall"], serde_json::Value::Null);
    }
}
