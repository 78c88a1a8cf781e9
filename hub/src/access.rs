//! SubjectAccessReviews on behalf of a user: the webhook asks whether an MCM's author may
//! read what the MCM names, the dashboard whether its caller may list MCMs and clusters.

use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};

/// Whether `user` may do what `attributes` describe, asked of the API server.
pub async fn review(
    client: &Client,
    user: &UserInfo,
    attributes: ResourceAttributes,
) -> Result<bool, kube::Error> {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: user.username.clone(),
            groups: user.groups.clone(),
            uid: user.uid.clone(),
            extra: user.extra.clone(),
            resource_attributes: Some(attributes),
            non_resource_attributes: None,
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await?;
    Ok(answer
        .status
        .is_some_and(|s| s.allowed && !s.denied.unwrap_or(false)))
}
