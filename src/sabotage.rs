//! Sabotage mode (the seed's "Modo Sabotaje"): a testing tool that makes a peer corrupt, drop
//! or delay a share of the pieces it serves, so tests and the demo can prove the defences.
//! A peer runs in it only when started with `--sabotage`; it is never read from config.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sabotage {
    /// Share of served pieces sent with flipped bytes.
    pub corrupt: f64,
    /// Share of requests silently not answered.
    pub drop: f64,
    /// Delay before each piece is sent.
    pub delay: Duration,
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Serve,
    Corrupt,
    Drop,
}

impl Sabotage {
    /// Parse `corrupt=0.3,drop=0.1,delay=200ms` (any subset).
    ///
    /// # Errors
    /// A message naming the bad part.
    pub fn parse(s: &str) -> Result<Sabotage, String> {
        let mut out = Sabotage::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("sabotage: {part:?} is not KEY=VALUE"))?;
            let share = || -> Result<f64, String> {
                let x: f64 = v
                    .parse()
                    .map_err(|_| format!("sabotage: {k}={v} is not a number"))?;
                if (0.0..=1.0).contains(&x) {
                    Ok(x)
                } else {
                    Err(format!("sabotage: {k}={v} is not a share from 0 to 1"))
                }
            };
            match k {
                "corrupt" => out.corrupt = share()?,
                "drop" => out.drop = share()?,
                "delay" => {
                    out.delay = humantime::parse_duration(v)
                        .map_err(|e| format!("sabotage: delay={v}: {e}"))?;
                }
                _ => {
                    return Err(format!(
                        "sabotage: unknown key {k:?} (corrupt, drop, delay)"
                    ))
                }
            }
        }
        Ok(out)
    }

    pub fn is_active(&self) -> bool {
        self.corrupt > 0.0 || self.drop > 0.0 || !self.delay.is_zero()
    }

    pub fn decide(&self, rng: &mut impl Rng) -> Action {
        let x: f64 = rng.gen();
        if x < self.drop {
            Action::Drop
        } else if x < self.drop + self.corrupt {
            Action::Corrupt
        } else {
            Action::Serve
        }
    }
}

/// Flip bytes across a copy of `data`.
pub fn corrupt(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let step = (v.len() / 16).max(1);
    for i in (0..v.len()).step_by(step) {
        v[i] ^= 0xA5;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_parse_any_subset_and_refuse_nonsense() {
        let s = Sabotage::parse("corrupt=0.3,drop=0.1,delay=200ms").unwrap();
        assert_eq!(s.corrupt, 0.3);
        assert_eq!(s.drop, 0.1);
        assert_eq!(s.delay, Duration::from_millis(200));
        assert_eq!(Sabotage::parse("delay=1s").unwrap().corrupt, 0.0);
        assert!(Sabotage::parse("corrupt=2").is_err());
        assert!(Sabotage::parse("explode=1").is_err());
        assert_ne!(corrupt(b"abcdef"), b"abcdef");
    }
}
