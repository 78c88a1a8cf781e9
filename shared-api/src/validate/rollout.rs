//! `spec.rolloutStrategy`: the type's settings, durations, numbers and percentages, groups.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Report;
use super::pod::selector_rules;
use crate::rollout::{
    RolloutConfig, RolloutStrategy, RolloutType, parse_deadline, parse_duration, scaled,
};

pub(super) fn rollout_rules(r: &mut Report, p: &str, s: &RolloutStrategy) {
    let unused = |r: &mut Report, field: &str, set: bool| {
        if set {
            r.push(
                format!("{p}.{field}"),
                format!(
                    "is set but type is {}: set type: {} or remove it",
                    s.type_.as_str(),
                    if field == "progressive" {
                        "Progressive"
                    } else {
                        "ProgressivePerGroup"
                    }
                ),
            );
        }
    };
    match s.type_ {
        RolloutType::All => {
            unused(r, "progressive", s.progressive.is_some());
            unused(r, "progressivePerGroup", s.progressive_per_group.is_some());
        }
        RolloutType::Progressive => {
            unused(r, "progressivePerGroup", s.progressive_per_group.is_some());
            if let Some(c) = &s.progressive {
                config_rules(r, &format!("{p}.progressive"), c);
            }
        }
        RolloutType::ProgressivePerGroup => {
            unused(r, "progressive", s.progressive.is_some());
            if let Some(c) = &s.progressive_per_group {
                let cp = format!("{p}.progressivePerGroup");
                if c.max_concurrency.is_some() {
                    r.push(
                        format!("{cp}.maxConcurrency"),
                        "applies only to type Progressive: a ProgressivePerGroup rollout moves a whole group at a time",
                    );
                }
                config_rules(r, &cp, c);
            }
        }
    }
}

fn count_rule(r: &mut Report, path: String, v: &IntOrString) {
    if let Err(e) = scaled(v, 100, true) {
        r.push(
            path,
            format!("{e}: give a number or a percentage such as 25%"),
        );
    }
}

fn config_rules(r: &mut Report, p: &str, c: &RolloutConfig) {
    if let Some(v) = &c.max_concurrency {
        count_rule(r, format!("{p}.maxConcurrency"), v);
        if matches!(v, IntOrString::Int(0))
            || matches!(v, IntOrString::String(s) if s == "0" || s == "0%")
        {
            r.push(
                format!("{p}.maxConcurrency"),
                "must be more than 0: nothing would ever move",
            );
        }
    }
    if let Some(v) = &c.max_failures {
        count_rule(r, format!("{p}.maxFailures"), v);
    }
    if let Some(t) = &c.min_success_time {
        r.check(format!("{p}.minSuccessTime"), parse_duration(t).map(|_| ()));
    }
    r.check(
        format!("{p}.progressDeadline"),
        parse_deadline(c.progress_deadline.as_deref())
            .map(|_| ())
            .map_err(|e| format!("{e}, or None")),
    );
    for (i, g) in c.mandatory_decision_groups.iter().enumerate() {
        let gp = format!("{p}.mandatoryDecisionGroups[{i}]");
        let named = g.group_name.as_deref().is_some_and(|n| !n.is_empty());
        match &g.cluster_selector {
            Some(sel) => {
                if sel.match_labels.is_empty() {
                    r.push(
                        format!("{gp}.clusterSelector.matchLabels"),
                        "must not be empty: an empty selector would make every cluster part of the group",
                    );
                }
                selector_rules(
                    r,
                    &format!("{gp}.clusterSelector.matchLabels"),
                    &sel.match_labels,
                );
                if g.group_index.is_some() {
                    r.push(
                        format!("{gp}.groupIndex"),
                        "cannot be combined with clusterSelector: the selector chooses the group",
                    );
                }
            }
            None if !named && g.group_index.is_none() => {
                r.push(gp.clone(), "needs clusterSelector, groupName or groupIndex")
            }
            None => {}
        }
        if let Some(i) = g.group_index
            && i < 0
        {
            r.push(format!("{gp}.groupIndex"), format!("{i} is negative"));
        }
    }
}
