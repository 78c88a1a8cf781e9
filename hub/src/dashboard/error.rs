//! The one error type of the dashboard: client errors say what was wrong, internal ones
//! are logged and answered without details.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kmm_runtime::ErrorCategory as _;

use super::model::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("user {user:?} may not {permission}")]
    Forbidden {
        user: String,
        permission: &'static str,
    },
    /// Too many failed authentications from this client address.
    #[error("too many failed authentications from this address; retry in {retry_after_secs} s")]
    TooManyFailures { retry_after_secs: u64 },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("no such endpoint; see /api/v1/openapi.json")]
    NoSuchPath,
    #[error("method not allowed (the API is read-only: GET, and POST for stream tickets)")]
    MethodNotAllowed,
    /// The API server could not answer a TokenReview or SubjectAccessReview.
    #[error("authentication backend: {0}")]
    AuthBackend(#[source] std::sync::Arc<kube::Error>),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::TooManyFailures { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NoSuchPath => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AuthBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the client sees: the message for its own mistakes, a fixed text otherwise.
    fn public_reason(&self) -> String {
        match self {
            ApiError::AuthBackend(_) => {
                "the hub cannot check the token right now; try again later".into()
            }
            other => other.to_string(),
        }
    }
}

impl kmm_runtime::ErrorCategory for ApiError {
    fn category(&self) -> &'static str {
        match self {
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::TooManyFailures { .. } => "rate_limited",
            ApiError::NotFound { .. } => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NoSuchPath => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::AuthBackend(_) => "unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::AuthBackend(detail) = &self {
            tracing::warn!(error = %detail, category = self.category(), "dashboard: authentication failed");
        }
        let status = self.status();
        let body = ErrorBody {
            error: self.category().into(),
            reason: self.public_reason(),
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyFailures { retry_after_secs } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}
