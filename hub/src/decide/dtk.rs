//! The Driver Toolkit image for a kernel, for Dockerfiles declaring `ARG DTK_AUTO`: the hub's
//! `driverToolkit` table first (an override, and the only source for fleets without
//! OpenShift), then what the spokes publish in their `kernel-dtk-images` claims (any cluster
//! running that kernel on OpenShift). Pure: callers hand in the table and the cluster facts.

use std::collections::BTreeMap;

use shared_api::ocm::DTK_IMAGES_CLAIM;

use super::facts::ClusterFacts;
use crate::render::build_job::DtkTable;

/// The image-status reason prefix when no source knows a kernel's toolkit image.
pub const DTK_UNKNOWN: &str = "DriverToolkitUnknown";

/// Where a toolkit image came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DtkSource {
    /// A row of the hub's `driverToolkit` table.
    Table,
    /// The claims of these clusters (sorted; at least one).
    Clusters(Vec<String>),
}

/// A kernel's toolkit image and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtkImage {
    pub image: String,
    pub source: DtkSource,
}

/// The Driver Toolkit image for `kernel`: the first matching row of `table`, else the image
/// the clusters' claims give for exactly that kernel. Clusters that disagree (different
/// OpenShift releases shipping one kernel) are settled by the image most of them publish,
/// then by name, so that the answer does not depend on the order of the clusters.
/// `Err` is the reason to show on the image: [`DTK_UNKNOWN`], the kernel and what to do.
pub fn dtk_image_for<'a>(
    kernel: &str,
    table: &DtkTable,
    clusters: impl IntoIterator<Item = &'a ClusterFacts>,
) -> Result<DtkImage, String> {
    if let Some(image) = table.image_for(kernel) {
        return Ok(DtkImage {
            image: image.to_string(),
            source: DtkSource::Table,
        });
    }
    let mut by_image: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for c in clusters {
        if let Some(image) = c.dtk_images.get(kernel) {
            by_image
                .entry(image.as_str())
                .or_default()
                .push(c.name.clone());
        }
    }
    // Most clusters first; among equals the smallest image name (BTreeMap order, and
    // `max_by_key` keeps the last maximum, so iterate in reverse).
    let best = by_image
        .into_iter()
        .rev()
        .max_by_key(|(_, clusters)| clusters.len());
    match best {
        Some((image, mut clusters)) => {
            clusters.sort();
            Ok(DtkImage {
                image: image.to_string(),
                source: DtkSource::Clusters(clusters),
            })
        }
        None => Err(format!(
            "{DTK_UNKNOWN}: the Dockerfile declares DTK_AUTO but no cluster publishes a Driver \
             Toolkit image for kernel {kernel} (ClusterClaim {DTK_IMAGES_CLAIM}, OpenShift \
             spokes) and the hub's driverToolkit table has none; build not started, retried \
             when a cluster publishes one"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::build_job::DtkEntry;

    fn cluster(name: &str, images: &[(&str, &str)]) -> ClusterFacts {
        ClusterFacts {
            name: name.into(),
            dtk_images: images
                .iter()
                .map(|(k, i)| (k.to_string(), i.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn table(rows: &[(&str, &str)]) -> DtkTable {
        DtkTable::new(
            &rows
                .iter()
                .map(|(k, i)| DtkEntry {
                    kernel: k.to_string(),
                    image: i.to_string(),
                })
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn the_table_overrides_the_claims() {
        let cs = [cluster("c1", &[("5.14.0-427", "dtk:417")])];
        let t = table(&[("^5\\.14\\.0-427$", "mirror/dtk:417")]);
        assert_eq!(
            dtk_image_for("5.14.0-427", &t, &cs),
            Ok(DtkImage {
                image: "mirror/dtk:417".into(),
                source: DtkSource::Table
            })
        );
        // A table row for another kernel leaves this one to the claims.
        let t = table(&[("^6\\.", "debian/dtk")]);
        assert_eq!(
            dtk_image_for("5.14.0-427", &t, &cs),
            Ok(DtkImage {
                image: "dtk:417".into(),
                source: DtkSource::Clusters(vec!["c1".into()])
            })
        );
    }

    #[test]
    fn any_cluster_running_the_kernel_answers_and_the_majority_wins() {
        let cs = [
            cluster("c3", &[("k", "dtk:b")]),
            cluster("c1", &[("k", "dtk:a")]),
            cluster("c2", &[("k", "dtk:b"), ("other", "dtk:o")]),
            cluster("plain", &[]),
        ];
        let got = dtk_image_for("k", &DtkTable::default(), &cs).unwrap();
        assert_eq!(got.image, "dtk:b");
        assert_eq!(
            got.source,
            DtkSource::Clusters(vec!["c2".into(), "c3".into()])
        );
        // A tie goes to the smaller image name, whatever the cluster order.
        let tie = [
            cluster("x", &[("k", "dtk:z")]),
            cluster("y", &[("k", "dtk:a")]),
        ];
        let mut rev = tie.clone();
        rev.reverse();
        assert_eq!(
            dtk_image_for("k", &DtkTable::default(), &tie)
                .unwrap()
                .image,
            "dtk:a"
        );
        assert_eq!(
            dtk_image_for("k", &DtkTable::default(), &rev)
                .unwrap()
                .image,
            "dtk:a"
        );
    }

    #[test]
    fn unknown_kernel_is_a_reason_not_a_guess() {
        let cs = [cluster("c1", &[("5.14.0-427", "dtk:417")])];
        // Exact kernels only: a prefix or a neighbour is no match.
        for k in ["5.14.0-42", "5.14.0-427.x86_64", "6.1.0"] {
            let e = dtk_image_for(k, &DtkTable::default(), &cs).unwrap_err();
            assert!(e.starts_with("DriverToolkitUnknown: "), "{e}");
            assert!(e.contains(&format!("kernel {k} ")), "{e}");
            assert!(e.contains(DTK_IMAGES_CLAIM), "{e}");
        }
        assert!(dtk_image_for("k", &DtkTable::default(), []).is_err());
    }
}
