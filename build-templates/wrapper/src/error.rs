//! Errors an HTTP caller sees, each with its status code and a metrics label.

use warp::http::StatusCode;

use crate::pool::InferError;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("the handler raised {0}")]
    Handler(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the Python worker exited while running this request ({0}); it is being restarted")]
    WorkerDied(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Handler(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) | ApiError::WorkerDied(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `kind` label of `kinfer_wrapper_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::NotFound(_) => "not_found",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Handler(_) => "handler",
            ApiError::Internal(_) => "internal",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::WorkerDied(_) => "worker_died",
        }
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        match e {
            InferError::Raised(msg) => ApiError::Handler(msg),
            InferError::BadOutput(msg) => ApiError::Internal(msg),
            InferError::WorkerDied(msg) => ApiError::WorkerDied(msg),
            InferError::Unavailable(msg) => ApiError::Unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_messages() {
        let cases = [
            (
                InferError::Raised("ValueError: boom".into()),
                500,
                "the handler raised ValueError: boom",
            ),
            (
                InferError::BadOutput("output \"y\" ...".into()),
                500,
                "output \"y\" ...",
            ),
            (
                InferError::WorkerDied("killed by signal 9".into()),
                503,
                "the Python worker exited while running this request (killed by signal 9); it is being restarted",
            ),
            (
                InferError::Unavailable("no worker".into()),
                503,
                "no worker",
            ),
        ];
        for (err, status, msg) in cases {
            let api = ApiError::from(err);
            assert_eq!(api.status().as_u16(), status);
            assert_eq!(api.to_string(), msg);
        }
        assert_eq!(ApiError::TooLarge(10).status().as_u16(), 413);
        assert_eq!(ApiError::NotFound("x".into()).status().as_u16(), 404);
        assert_eq!(ApiError::BadRequest("x".into()).status().as_u16(), 400);
    }
}
