//! The scenario file: how many peers, the file, and the timed or progress-triggered steps.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scenario {
    pub(crate) peers: usize,
    pub(crate) size: String,
    pub(crate) piece_size: String,
    #[serde(default = "no_limit")]
    pub(crate) upload_rate: String,
    #[serde(default, rename = "step")]
    pub(crate) steps: Vec<Step>,
}

fn no_limit() -> String {
    "0".into()
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
