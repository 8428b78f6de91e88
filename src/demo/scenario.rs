//! The scenario file: how many peers, the file, the timed or progress-triggered steps, and
//! (optionally) every host's link for the emulated network.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::emu::{Link, LinkSpec};

const DEFAULT: &str = include_str!("default.toml");
/// The scenarios shipped with the binary, by name (`shoal demo --scenario homogeneous`).
pub(crate) const SHIPPED: [(&str, &str); 6] = [
    ("default", DEFAULT),
    ("homogeneous", include_str!("scenarios/homogeneous.toml")),
    (
        "heterogeneous",
        include_str!("scenarios/heterogeneous.toml"),
    ),
    ("uplinks", include_str!("scenarios/uplinks.toml")),
    ("far", include_str!("scenarios/far.toml")),
    ("seed", include_str!("scenarios/seed.toml")),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    pub(crate) peers: usize,
    pub(crate) size: String,
    pub(crate) piece_size: String,
    #[serde(default = "no_limit")]
    pub(crate) upload_rate: String,
    /// Every host's link; without it the demo runs on loopback.
    #[serde(default)]
    pub(crate) link: Option<LinkSpec>,
    /// Per host (`seeder`, `leecher1`.., `trackerA`, `trackerB`, `saboteur`, `late`): what
    /// differs from `[link]`.
    #[serde(default)]
    pub(crate) host: BTreeMap<String, LinkSpec>,
    /// The emulated interfaces' MTU.
    #[serde(default = "default_mtu")]
    pub(crate) mtu: u32,
    #[serde(default, rename = "step")]
    pub(crate) steps: Vec<Step>,
}

fn no_limit() -> String {
    "0".into()
}

fn default_mtu() -> u32 {
    1500
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Step {
    pub(crate) at_progress: Option<f64>,
    pub(crate) at_secs: Option<f64>,
    pub(crate) action: Action,
    pub(crate) peer: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Action {
    Sabotage,
    KillTracker,
    RestartTracker,
    KillPeer,
    RestartPeer,
    AddPeer,
}

impl Scenario {
    /// Read a scenario: a file, or the name of a shipped one; None = the default.
    pub(crate) fn load(path: Option<&Path>) -> anyhow::Result<Scenario> {
        let text = match path {
            None => DEFAULT.to_string(),
            Some(p) if !p.exists() => match SHIPPED.iter().find(|(n, _)| Path::new(n) == p) {
                Some((_, t)) => t.to_string(),
                None => bail!(
                    "cannot read scenario {}: no such file, and the shipped ones are {}",
                    p.display(),
                    SHIPPED.map(|(n, _)| n).join(", ")
                ),
            },
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read scenario {}", p.display()))?,
        };
        toml::from_str(&text).context("scenario")
    }

    /// Refuse what cannot be played, before anything starts.
    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        if self.peers == 0 {
            bail!("the demo needs at least one leecher");
        }
        if self.peers > 64 {
            bail!("at most 64 leechers");
        }
        if !(576..=65_000).contains(&self.mtu) {
            bail!("scenario: mtu {} is not within 576..65000", self.mtu);
        }
        for s in &self.steps {
            if s.at_progress.is_none() && s.at_secs.is_none() {
                bail!(
                    "scenario: step {:?} has neither at_progress nor at_secs",
                    s.action
                );
            }
            if matches!(s.action, Action::KillPeer | Action::RestartPeer)
                && !(1..=self.peers).contains(&s.peer.unwrap_or(0))
            {
                bail!(
                    "scenario: step {:?} needs `peer` from 1 to {}",
                    s.action,
                    self.peers
                );
            }
        }
        let names = self.host_names();
        if let Some(h) = self.host.keys().find(|h| !names.contains(h)) {
            bail!(
                "scenario: [host.{h}] is not a host of this scenario ({})",
                names.join(", ")
            );
        }
        self.links()?;
        Ok(())
    }

    /// Every host the scenario can start, in order: trackers, seeder, leechers, then the ones
    /// its steps add.
    pub(crate) fn host_names(&self) -> Vec<String> {
        let mut v: Vec<String> = ["trackerA", "trackerB", "seeder"]
            .map(String::from)
            .to_vec();
        v.extend((1..=self.peers).map(|i| format!("leecher{i}")));
        if self.steps.iter().any(|s| s.action == Action::Sabotage) {
            v.push("saboteur".into());
        }
        let late = self
            .steps
            .iter()
            .filter(|s| s.action == Action::AddPeer)
            .count();
        v.extend((1..=late).map(late_name));
        v
    }

    /// Each host's link, when the scenario describes links.
    pub(crate) fn links(&self) -> anyhow::Result<Option<Vec<(String, Link)>>> {
        let Some(base) = &self.link else {
            return Ok(None);
        };
        self.host_names()
            .into_iter()
            .map(|n| {
                let spec = self.host.get(&n).cloned().unwrap_or_default().over(base);
                let link = spec.resolve().with_context(|| format!("link of {n}"))?;
                Ok((n, link))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }
}

/// The k-th late peer (1-based): `late`, `late2`, ...
pub(crate) fn late_name(k: usize) -> String {
    if k <= 1 {
        "late".into()
    } else {
        format!("late{k}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_should_parse_every_shipped_scenario() {
        for (name, text) in SHIPPED {
            let sc: Scenario = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            sc.validate().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }
}
