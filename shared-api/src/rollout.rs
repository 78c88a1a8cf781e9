//! `spec.rolloutStrategy` and `status.rollout` of a ManagedClusterModule: how the hub moves the
//! selected clusters to a new revision of their ManifestWork, in OCM's vocabulary
//! (`cluster.open-cluster-management.io/v1alpha1` `RolloutStrategy`), with groups that may be
//! chosen by cluster label as well as by Placement decision group.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation an admin sets on a halted MCM to resume its rollout (any value); the hub
/// removes it once it has acted on it. The clusters that failed so far are accepted (they
/// keep the new revision and no longer count against `maxFailures`), and the rollout goes on.
pub const RESUME_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/rollout-resume";
/// On a ManifestWork: when the hub moved it to the revision it carries (RFC 3339).
pub const STARTED_AT_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/rollout-started-at";
/// On a ManifestWork: since when the hub has seen its Module available on every selected
/// node, without interruption (RFC 3339); kept once `minSuccessTime` has passed.
pub const AVAILABLE_SINCE_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/rollout-available-since";
/// On a ManifestWork: its failure at the revision it carries was accepted by a resume.
pub const FAILURE_ACCEPTED_ANNOTATION: &str = "hub.kmm.sigs.x-k8s.io/rollout-failure-accepted";

/// See `spec.rolloutStrategy`.
// CEL: the settings must be those of the type (`validate` checks the values too).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.progressive) || (has(self.type) && self.type == 'Progressive')")
    .message("progressive is set but type is not Progressive").field_path(".progressive"))]
#[x_kube(validation = Rule::new("!has(self.progressivePerGroup) || (has(self.type) && self.type == 'ProgressivePerGroup')")
    .message("progressivePerGroup is set but type is not ProgressivePerGroup").field_path(".progressivePerGroup"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// `All` (default): every selected cluster gets a new revision at once. `Progressive`:
    /// cluster by cluster, at most `progressive.maxConcurrency` at a time, mandatory groups
    /// first. `ProgressivePerGroup`: group by group (mandatory groups, then Placement decision
    /// groups by index, then every other cluster as one last group).
    #[serde(default, rename = "type")]
    pub type_: RolloutType,
    /// Settings of `type: Progressive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressive: Option<RolloutConfig>,
    /// Settings of `type: ProgressivePerGroup` (`maxConcurrency` does not apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressive_per_group: Option<RolloutConfig>,
}

/// See `spec.rolloutStrategy.type`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutType {
    #[default]
    All,
    Progressive,
    ProgressivePerGroup,
}

impl RolloutType {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutType::All => "All",
            RolloutType::Progressive => "Progressive",
            RolloutType::ProgressivePerGroup => "ProgressivePerGroup",
        }
    }
}

/// The settings of a progressive rollout (OCM's `RolloutConfig`, `MandatoryDecisionGroups`
/// and, for `Progressive`, `maxConcurrency`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutConfig {
    /// Groups rolled out first, in this order, before any other cluster; each must succeed
    /// completely (no failure is tolerated in them) before the next group or the rest moves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mandatory_decision_groups: Vec<MandatoryDecisionGroup>,
    /// `Progressive` only: at most this many clusters (a number, or a percentage of the
    /// clusters in the rollout, rounded up) are moving at a time. Unset: no limit besides the
    /// mandatory groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<IntOrString>,
    /// How long a cluster must stay succeeded (ManifestWork applied, Module available on
    /// every selected node) before it counts as updated and the rollout goes on, e.g. `90s`,
    /// `5m`, `1h`. Default `0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_time: Option<String>,
    /// How long a moved cluster may take to succeed before it counts as failed, e.g. `10m`;
    /// `None` (default) waits for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    /// How many failed clusters (a number, or a percentage, rounded down, of the clusters in
    /// the rollout for `Progressive`, of the current group for `ProgressivePerGroup`) are
    /// tolerated before the rollout halts. Default 0. Mandatory groups tolerate none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<IntOrString>,
}

/// One mandatory group: the clusters a `clusterSelector` matches (then `groupName` only names
/// the group), or the Placement decision group named `groupName`, or else numbered
/// `groupIndex`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MandatoryDecisionGroup {
    /// The group's name in status and events; without `clusterSelector`, the Placement
    /// decision group of that name (label `cluster.open-cluster-management.io/decision-group-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
    /// Without `clusterSelector` and `groupName`: the Placement decision group of that index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_index: Option<i32>,
    /// kmm-fleet addition: the group's clusters by ManagedCluster label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_selector: Option<GroupClusterSelector>,
}

/// Equality selector over ManagedCluster labels; must not be empty.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupClusterSelector {
    /// Every label must match.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl MandatoryDecisionGroup {
    /// How the group is shown in status and events.
    pub fn display_name(&self, position: usize) -> String {
        match (&self.group_name, self.group_index) {
            (Some(n), _) if !n.is_empty() => n.clone(),
            (_, Some(i)) if self.cluster_selector.is_none() => format!("decision group {i}"),
            _ => format!("mandatory group {}", position + 1),
        }
    }

    /// Whether a cluster (labels, Placement decision group) belongs to this group.
    pub fn contains(
        &self,
        labels: &BTreeMap<String, String>,
        decision_group: Option<(i32, &str)>,
    ) -> bool {
        if let Some(sel) = &self.cluster_selector {
            return sel
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v));
        }
        match (&self.group_name, self.group_index, decision_group) {
            (Some(n), _, Some((_, gn))) if !n.is_empty() => n == gn,
            (_, Some(i), Some((gi, _))) => i == gi,
            _ => false,
        }
    }
}

impl RolloutStrategy {
    /// The settings of the chosen progressive type; `None` for `All`.
    pub fn config(&self) -> Option<RolloutConfig> {
        match self.type_ {
            RolloutType::All => None,
            RolloutType::Progressive => Some(self.progressive.clone().unwrap_or_default()),
            RolloutType::ProgressivePerGroup => {
                Some(self.progressive_per_group.clone().unwrap_or_default())
            }
        }
    }
}

/// A rollout duration: OCM's `[0-9]+(h|m|s)` and Go-style sums such as `1h30m`; `0` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut digits = String::new();
    let mut any = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => {
                return Err(format!(
                    "{text:?} is not a duration such as 90s, 5m, 1h or 1h30m"
                ));
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a duration such as 90s, 5m, 1h or 1h30m"))?;
        total += Duration::from_secs(n.saturating_mul(unit));
        digits.clear();
        any = true;
    }
    if !any || !digits.is_empty() {
        return Err(format!(
            "{text:?} is not a duration such as 90s, 5m, 1h or 1h30m"
        ));
    }
    Ok(total)
}

/// `progressDeadline`: a duration, or `None` (and unset) for no deadline.
pub fn parse_deadline(text: Option<&str>) -> Result<Option<Duration>, String> {
    match text.map(str::trim) {
        None | Some("None") => Ok(None),
        Some(t) => parse_duration(t).map(Some),
    }
}

/// A number or a percentage (`0%`–`100%`) scaled to `total`; percentages round up when
/// `round_up`, else down.
pub fn scaled(value: &IntOrString, total: usize, round_up: bool) -> Result<usize, String> {
    match value {
        IntOrString::Int(n) if *n >= 0 => Ok(*n as usize),
        IntOrString::Int(n) => Err(format!("{n} is negative")),
        IntOrString::String(s) => {
            let bad = || format!("{s:?} is neither a number nor a percentage from 0% to 100%");
            let Some(p) = s.strip_suffix('%') else {
                return s.parse::<usize>().map_err(|_| bad());
            };
            let p: usize = p.parse().map_err(|_| bad())?;
            if p > 100 {
                return Err(bad());
            }
            let product = p * total;
            Ok(if round_up {
                product.div_ceil(100)
            } else {
                product / 100
            })
        }
    }
}

/// Where a rollout stands: `Progressing`, `Halted` or `Complete`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Clusters are still to be moved or are moving.
    #[default]
    Progressing,
    /// Too many clusters failed: nothing moves until the spec changes or the admin resumes.
    Halted,
    /// Every cluster of the rollout runs the revision.
    Complete,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Halted => "Halted",
            RolloutPhase::Complete => "Complete",
        }
    }
}

/// `status.rollout`: present for `Progressive` and `ProgressivePerGroup`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// A short hash of what the selected clusters' Modules are now (the spec without
    /// `rolloutStrategy`, and the pinned images); a new revision starts a new rollout.
    pub revision: String,
    /// `Progressive` or `ProgressivePerGroup`.
    pub strategy: String,
    pub phase: RolloutPhase,
    /// Clusters in the rollout (selected, with a ManifestWork to ship).
    #[serde(default)]
    pub total: i32,
    /// Clusters at the revision that succeeded (and held for `minSuccessTime`).
    #[serde(default)]
    pub updated: i32,
    /// Clusters moved to the revision that have not succeeded or failed yet.
    #[serde(default)]
    pub in_progress: i32,
    /// Clusters at the revision reporting Degraded, or past `progressDeadline`.
    #[serde(default)]
    pub failed: i32,
    /// Clusters not moved yet: they keep exactly the ManifestWork they had (or none).
    #[serde(default)]
    pub pending: i32,
    /// The wave being rolled out (1 is the first mandatory group, or the first
    /// `maxConcurrency` clusters).
    #[serde(default)]
    pub wave: i32,
    /// The group being rolled out, when groups apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_group: Option<String>,
    /// Why the rollout halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halt_reason: Option<String>,
    /// Clusters that failed at this revision, by name, including failures a resume accepted
    /// (bounded, see `failedClustersOmitted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_clusters: Vec<String>,
    /// Failed clusters beyond the list's limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_clusters_omitted: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let s = |n| Ok(Duration::from_secs(n));
        assert_eq!(parse_duration("0"), s(0));
        assert_eq!(parse_duration("90s"), s(90));
        assert_eq!(parse_duration("5m"), s(300));
        assert_eq!(parse_duration("2h"), s(7200));
        assert_eq!(parse_duration("1h30m5s"), s(5405));
        for bad in ["", "5", "m", "5x", "1.5h", "-5s", "5m3"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_deadline(None), Ok(None));
        assert_eq!(parse_deadline(Some("None")), Ok(None));
        assert_eq!(
            parse_deadline(Some("10s")),
            Ok(Some(Duration::from_secs(10)))
        );
        assert!(parse_deadline(Some("soon")).is_err());
    }

    #[test]
    fn numbers_and_percentages() {
        let s = |v: &str| IntOrString::String(v.into());
        assert_eq!(scaled(&IntOrString::Int(3), 10, true), Ok(3));
        assert_eq!(scaled(&s("3"), 10, true), Ok(3));
        assert_eq!(scaled(&s("25%"), 10, true), Ok(3));
        assert_eq!(scaled(&s("25%"), 10, false), Ok(2));
        assert_eq!(scaled(&s("100%"), 7, false), Ok(7));
        assert_eq!(scaled(&s("0%"), 7, true), Ok(0));
        assert!(scaled(&s("101%"), 7, true).is_err());
        assert!(scaled(&s("x%"), 7, true).is_err());
        assert!(scaled(&IntOrString::Int(-1), 7, true).is_err());
    }

    #[test]
    fn groups_by_label_name_or_index() {
        let labels: BTreeMap<String, String> = [("ring".to_string(), "canary".to_string())].into();
        let by_label = MandatoryDecisionGroup {
            group_name: Some("canary".into()),
            cluster_selector: Some(GroupClusterSelector {
                match_labels: labels.clone(),
            }),
            ..Default::default()
        };
        assert!(by_label.contains(&labels, None));
        assert!(!by_label.contains(&BTreeMap::new(), Some((0, "canary"))));
        assert_eq!(by_label.display_name(0), "canary");
        let by_name = MandatoryDecisionGroup {
            group_name: Some("canary".into()),
            ..Default::default()
        };
        assert!(by_name.contains(&BTreeMap::new(), Some((3, "canary"))));
        assert!(!by_name.contains(&labels, None));
        let by_index = MandatoryDecisionGroup {
            group_index: Some(1),
            ..Default::default()
        };
        assert!(by_index.contains(&BTreeMap::new(), Some((1, ""))));
        assert!(!by_index.contains(&BTreeMap::new(), Some((0, ""))));
        assert_eq!(by_index.display_name(0), "decision group 1");
    }
}
