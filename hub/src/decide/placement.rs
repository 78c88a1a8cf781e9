//! `spec.placementRef`: the clusters an OCM Placement decided, with their decision groups, or
//! why the MCM has to wait. Pure: the caches hand in what the PlacementDecision watch keeps.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use shared_api::ocm::{
    DECISION_GROUP_INDEX_LABEL, DECISION_GROUP_NAME_LABEL, PLACEMENT_LABEL, PlacementDecision,
};

/// A Placement's decision group (`spec.decisionStrategy.groupStrategy` of the Placement; a
/// Placement without one puts every cluster in group 0 with an empty name). For rollouts that
/// go group by group: `(index, name)` as OCM's `ProgressivePerGroup` orders them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct DecisionGroup {
    pub index: i32,
    pub name: String,
}

impl DecisionGroup {
    pub fn as_tuple(&self) -> (i32, &str) {
        (self.index, self.name.as_str())
    }
}

/// What the hub keeps of one PlacementDecision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DecisionEntry {
    /// The Placement it belongs to (label [`PLACEMENT_LABEL`]).
    pub placement: String,
    pub group: DecisionGroup,
    /// The decided clusters (empty decisions left out).
    pub clusters: Vec<String>,
}

impl DecisionEntry {
    /// `None` for an object without the placement label (not a Placement's decision).
    pub fn from_decision(d: &PlacementDecision) -> Option<Self> {
        let labels = labels(&d.metadata);
        let placement = labels.get(PLACEMENT_LABEL)?.clone();
        let group = DecisionGroup {
            index: labels
                .get(DECISION_GROUP_INDEX_LABEL)
                .and_then(|i| i.parse().ok())
                .unwrap_or(0),
            name: labels
                .get(DECISION_GROUP_NAME_LABEL)
                .cloned()
                .unwrap_or_default(),
        };
        let clusters = d
            .status
            .as_ref()
            .map(|s| {
                s.decisions
                    .iter()
                    .map(|c| c.cluster_name.trim().to_string())
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            placement,
            group,
            clusters,
        })
    }
}

fn labels(m: &ObjectMeta) -> BTreeMap<String, String> {
    m.labels.clone().unwrap_or_default()
}

/// Why an MCM with `spec.placementRef` cannot follow its Placement now. Either way the
/// clusters keep what they were shipped: nothing is written or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementHold {
    /// `PlacementNotFound` or `PlacementPending`.
    pub reason: &'static str,
    pub message: String,
}

pub const PLACEMENT_NOT_FOUND: &str = "PlacementNotFound";
pub const PLACEMENT_PENDING: &str = "PlacementPending";

/// The clusters Placement `name` (in `namespace`) decided, each with its decision group, from
/// its PlacementDecisions. `synced`: the hub has listed Placements and PlacementDecisions;
/// `exists`: the Placement is there. A Placement without any PlacementDecision yet has not
/// decided (OCM writes one, possibly empty, once it has); one with empty decisions selects no
/// cluster. A cluster in several groups (not something OCM writes) keeps the first.
pub fn placement_clusters<'a>(
    name: &str,
    namespace: &str,
    synced: bool,
    exists: bool,
    decisions: impl IntoIterator<Item = &'a DecisionEntry>,
) -> Result<BTreeMap<String, DecisionGroup>, PlacementHold> {
    if !synced {
        return Err(PlacementHold {
            reason: PLACEMENT_PENDING,
            message: format!(
                "Placement {namespace}/{name}: the hub has not listed Placements and PlacementDecisions yet; clusters keep what they were shipped"
            ),
        });
    }
    if !exists {
        return Err(PlacementHold {
            reason: PLACEMENT_NOT_FOUND,
            message: format!(
                "spec.placementRef: Placement {namespace}/{name} does not exist; create it (with a ManagedClusterSetBinding in {namespace}) — until then clusters keep what they were shipped"
            ),
        });
    }
    let mut mine: Vec<&DecisionEntry> = decisions
        .into_iter()
        .filter(|d| d.placement == name)
        .collect();
    if mine.is_empty() {
        return Err(PlacementHold {
            reason: PLACEMENT_PENDING,
            message: format!(
                "Placement {namespace}/{name} has no PlacementDecision yet; clusters keep what they were shipped"
            ),
        });
    }
    mine.sort_by(|a, b| a.group.cmp(&b.group));
    let mut out = BTreeMap::new();
    for d in mine {
        for c in &d.clusters {
            out.entry(c.clone()).or_insert_with(|| d.group.clone());
        }
    }
    Ok(out)
}

/// Give every planned cluster its decision group.
pub fn assign_groups(plan: &mut super::plan::Plan, groups: &BTreeMap<String, DecisionGroup>) {
    for cp in &mut plan.clusters {
        cp.decision_group = groups.get(&cp.cluster).cloned();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_api::ocm::{ClusterDecision, PlacementDecisionStatus};

    fn decision(labels: &[(&str, &str)], clusters: &[&str]) -> PlacementDecision {
        PlacementDecision {
            metadata: ObjectMeta {
                name: Some("pd".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            status: Some(PlacementDecisionStatus {
                decisions: clusters
                    .iter()
                    .map(|c| ClusterDecision {
                        cluster_name: c.to_string(),
                        reason: String::new(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn entry(placement: &str, group: (i32, &str), clusters: &[&str]) -> DecisionEntry {
        let index = group.0.to_string();
        DecisionEntry::from_decision(&decision(
            &[
                (PLACEMENT_LABEL, placement),
                (DECISION_GROUP_INDEX_LABEL, index.as_str()),
                (DECISION_GROUP_NAME_LABEL, group.1),
            ],
            clusters,
        ))
        .unwrap()
    }

    #[test]
    fn decisions_are_read_from_labels_and_status() {
        let e = entry("p", (1, "prod"), &["c1", "", "c2"]);
        assert_eq!(e.placement, "p");
        assert_eq!(e.group.as_tuple(), (1, "prod"));
        assert_eq!(e.clusters, vec!["c1", "c2"], "empty decisions left out");
        assert_eq!(DecisionEntry::from_decision(&decision(&[], &["c1"])), None);
        // Without group labels (an older placement controller): group 0, no name.
        let e = DecisionEntry::from_decision(&decision(&[(PLACEMENT_LABEL, "p")], &["c"])).unwrap();
        assert_eq!(e.group, DecisionGroup::default());
    }

    #[test]
    fn the_decided_clusters_with_their_groups() {
        let ds = [
            entry("p", (1, "rest"), &["c3", "c1"]),
            entry("p", (0, "canary"), &["c1", "c2"]),
            entry("other", (0, ""), &["c9"]),
        ];
        let got = placement_clusters("p", "kmm-hub", true, true, &ds).unwrap();
        let groups: Vec<(&str, (i32, &str))> = got
            .iter()
            .map(|(c, g)| (c.as_str(), g.as_tuple()))
            .collect();
        assert_eq!(
            groups,
            vec![
                ("c1", (0, "canary")),
                ("c2", (0, "canary")),
                ("c3", (1, "rest"))
            ]
        );
        // Decided, and nothing chosen: no cluster (works go).
        let empty = [entry("p", (0, ""), &[])];
        assert!(
            placement_clusters("p", "ns", true, true, &empty)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn missing_or_undecided_placements_hold() {
        let ds = [entry("p", (0, ""), &["c1"])];
        let e = placement_clusters("q", "kmm-hub", true, false, &ds).unwrap_err();
        assert_eq!(e.reason, PLACEMENT_NOT_FOUND);
        assert!(e.message.contains("kmm-hub/q"), "{}", e.message);
        let e = placement_clusters("q", "kmm-hub", true, true, &ds).unwrap_err();
        assert_eq!(e.reason, PLACEMENT_PENDING);
        let e = placement_clusters("p", "kmm-hub", false, true, &ds).unwrap_err();
        assert_eq!(e.reason, PLACEMENT_PENDING);
    }
}
