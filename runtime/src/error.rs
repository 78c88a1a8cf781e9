//! One vocabulary for what went wrong: every error type of the controllers names a short,
//! static category. Categories are metric labels and event reasons, so they are bounded (a
//! handful per type, never built from messages or object names).

/// A short, static, bounded name for an error: `"apply-daemonset"`, `"registry"`, `"forbidden"`.
pub trait ErrorCategory {
    fn category(&self) -> &'static str;
}

impl<E: ErrorCategory + ?Sized> ErrorCategory for &E {
    fn category(&self) -> &'static str {
        (**self).category()
    }
}

impl<E: ErrorCategory + ?Sized> ErrorCategory for Box<E> {
    fn category(&self) -> &'static str {
        (**self).category()
    }
}

impl<E: ErrorCategory + ?Sized> ErrorCategory for std::sync::Arc<E> {
    fn category(&self) -> &'static str {
        (**self).category()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Failure {
        Api,
        Encode,
    }

    impl ErrorCategory for Failure {
        fn category(&self) -> &'static str {
            match self {
                Failure::Api => "api",
                Failure::Encode => "encode",
            }
        }
    }

    #[test]
    fn categories_pass_through_references_and_boxes() {
        let boxed: Box<dyn ErrorCategory> = Box::new(Failure::Encode);
        assert_eq!(boxed.category(), "encode");
        let by_ref: &dyn ErrorCategory = &Failure::Api;
        assert_eq!(by_ref.category(), "api");
        assert_eq!(ErrorCategory::category(&&Failure::Api), "api");
        assert_eq!(std::sync::Arc::new(Failure::Api).category(), "api");
    }
}
