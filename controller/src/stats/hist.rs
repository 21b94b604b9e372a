//! Waiting-time histograms: fixed buckets that merge by addition, so daily and monthly rollups
//! can be combined into any range and still give percentiles and service levels. A bucket holds
//! the waits in `(previous edge, edge]`; edges are every 5 s up to 10 min, every 30 s up to an
//! hour, every minute up to 4 h, then one overflow bucket. A percentile is the upper edge of the
//! bucket that holds its rank (capped at the observed maximum), so it is exact for waits on an
//! edge and otherwise at most one bucket width above the true value; a service level against a
//! KPI in whole minutes (up to 4 h) is exact.

const FINE: i64 = 600_000; // 10 min
const MEDIUM: i64 = 3_600_000; // 1 h
const COARSE: i64 = 14_400_000; // 4 h
const FINE_W: i64 = 5_000;
const MEDIUM_W: i64 = 30_000;
const COARSE_W: i64 = 60_000;
const FINE_N: u32 = (FINE / FINE_W) as u32; // 120
const MEDIUM_N: u32 = FINE_N + ((MEDIUM - FINE) / MEDIUM_W) as u32; // 220
const COARSE_N: u32 = MEDIUM_N + ((COARSE - MEDIUM) / COARSE_W) as u32; // 400
const OVERFLOW: u32 = COARSE_N + 1;

fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The bucket of a wait in milliseconds.
pub fn bucket(ms: i64) -> u32 {
    if ms <= 0 {
        0
    } else if ms <= FINE {
        ceil_div(ms, FINE_W) as u32
    } else if ms <= MEDIUM {
        FINE_N + ceil_div(ms - FINE, MEDIUM_W) as u32
    } else if ms <= COARSE {
        MEDIUM_N + ceil_div(ms - MEDIUM, COARSE_W) as u32
    } else {
        OVERFLOW
    }
}

/// The largest wait a bucket holds (`None` for the overflow bucket).
pub fn upper_edge(b: u32) -> Option<i64> {
    if b <= FINE_N {
        Some(i64::from(b) * FINE_W)
    } else if b <= MEDIUM_N {
        Some(FINE + i64::from(b - FINE_N) * MEDIUM_W)
    } else if b <= COARSE_N {
        Some(MEDIUM + i64::from(b - MEDIUM_N) * COARSE_W)
    } else {
        None
    }
}

/// Counts per bucket, indexed by bucket (trailing empty buckets are not held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Histogram(Vec<u64>);

impl Histogram {
    fn slot(&mut self, b: u32) -> &mut u64 {
        let i = b as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        &mut self.0[i]
    }

    pub fn add(&mut self, ms: i64) {
        *self.slot(bucket(ms)) += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            *mine += theirs;
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    fn nonempty(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0.iter().enumerate().filter(|(_, n)| **n > 0).map(|(b, n)| (b as u32, *n))
    }

    /// Nearest-rank percentile (`p` in 0..=1), capped at `max`.
    pub fn percentile(&self, p: f64, max: i64) -> Option<i64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((p * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (b, count) in self.nonempty() {
            seen += count;
            if seen >= rank {
                return Some(upper_edge(b).map_or(max, |edge| edge.min(max)));
            }
        }
        Some(max)
    }

    /// How many waits are at most `limit_ms` (exact when `limit_ms` is an edge).
    pub fn count_at_most(&self, limit_ms: i64) -> u64 {
        self.nonempty()
            .take_while(|(b, _)| upper_edge(*b).is_some_and(|edge| edge <= limit_ms))
            .map(|(_, n)| n)
            .sum()
    }

    /// The buckets with their upper edges, for charts (`None`: beyond 4 h).
    pub fn buckets(&self) -> impl Iterator<Item = (Option<i64>, u64)> + '_ {
        self.nonempty().map(|(b, n)| (upper_edge(b), n))
    }

    /// Compact text form for storage: runs of consecutive buckets, `first:count,count,…`,
    /// joined by `;` (rollup rows hold many of these; the runs keep them short).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let mut previous: Option<u32> = None;
        for (b, n) in self.nonempty() {
            match previous {
                Some(p) if p + 1 == b => out.push(','),
                Some(_) => out.push_str(&format!(";{b}:")),
                None => out.push_str(&format!("{b}:")),
            }
            out.push_str(&n.to_string());
            previous = Some(b);
        }
        out
    }

    /// Parses [`Histogram::encode`]'s form. Rollup queries decode thousands of these, so this
    /// reads the bytes once, into a fixed array, and allocates once.
    pub fn decode(text: &str) -> Result<Self, String> {
        let bytes = text.as_bytes();
        let bad = |at: usize| {
            let shown: String = text.chars().take(40).collect();
            format!("bad histogram at byte {at} of {shown:?}")
        };
        let number = |i: &mut usize| -> Option<u64> {
            let start = *i;
            let mut v: u64 = 0;
            while let Some(d) = bytes.get(*i).filter(|c| c.is_ascii_digit()) {
                v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                *i += 1;
            }
            (*i > start).then_some(v)
        };
        let mut counts = [0u64; OVERFLOW as usize + 1];
        let mut len = 0;
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b';' {
                i += 1;
                continue;
            }
            let mut b = number(&mut i).ok_or_else(|| bad(i))?;
            if bytes.get(i) != Some(&b':') {
                return Err(bad(i));
            }
            i += 1;
            loop {
                let n = number(&mut i).ok_or_else(|| bad(i))?;
                let slot = usize::try_from(b)
                    .ok()
                    .and_then(|b| counts.get_mut(b))
                    .ok_or_else(|| format!("histogram bucket {b} out of range"))?;
                *slot = slot.checked_add(n).ok_or_else(|| bad(i))?;
                len = len.max(b as usize + 1);
                if bytes.get(i) != Some(&b',') {
                    break;
                }
                i += 1;
                b += 1;
            }
            match bytes.get(i) {
                None | Some(b';') => i += 1,
                Some(_) => return Err(bad(i)),
            }
        }
        Ok(Histogram(counts[..len].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_inclusive_and_round_trip() {
        for ms in [0, 1, 4_999, 5_000, 5_001, 600_000, 600_001, 3_600_000, 14_400_000, 14_400_001] {
            let b = bucket(ms);
            match upper_edge(b) {
                Some(edge) => {
                    assert!(ms <= edge, "{ms} ≤ edge {edge}");
                    assert!(b == 0 || upper_edge(b - 1).is_some_and(|prev| ms > prev), "{ms}");
                }
                None => assert!(ms > COARSE),
            }
        }
        // Every whole minute up to 4 h is an edge.
        for minute in 0..=240 {
            assert_eq!(upper_edge(bucket(minute * 60_000)), Some(minute * 60_000), "{minute} min");
        }
    }

    #[test]
    fn percentiles_and_service_levels_are_exact_on_edges() {
        let mut h = Histogram::default();
        for m in [2, 4, 6, 30] {
            h.add(m * 60_000);
        }
        assert_eq!(h.percentile(0.5, 30 * 60_000), Some(4 * 60_000));
        assert_eq!(h.percentile(0.9, 30 * 60_000), Some(30 * 60_000));
        assert_eq!(h.count_at_most(6 * 60_000), 3);
        assert_eq!(h.count_at_most(5 * 60_000), 2);
        // Off-edge values round up to their bucket, never beyond the maximum.
        let mut odd = Histogram::default();
        odd.add(61_234);
        assert_eq!(odd.percentile(0.5, 61_234), Some(61_234));
        odd.add(70_001);
        assert_eq!(odd.percentile(0.5, 70_001), Some(65_000));
        let mut merged = h.clone();
        merged.merge(&odd);
        assert_eq!(merged.count(), 6);
        merged.add(60_000);
        merged.add(74_000);
        assert_eq!(merged.encode(), "12:1,1;15:2;24:1;48:1;72:1;160:1");
        assert_eq!(Histogram::decode(&merged.encode()), Ok(merged));
        assert!(Histogram::decode("1:2,x").is_err());
        assert!(Histogram::decode("9999:1").is_err());
        for bad in ["5:", ":1", "5;1", "5:1,", "5:1:2", "401:1,1", "1:99999999999999999999"] {
            assert!(Histogram::decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Histogram::decode(""), Ok(Histogram::default()));
        assert_eq!(Histogram::decode("2:1;2:2").map(|h| h.count()), Ok(3));
    }
}
