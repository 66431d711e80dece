//! Waiting on something that is not always there.

/// Awaits `f`; never completes when there is none. For a `select!` branch whose timer, task or
/// signal exists only at times.
pub(crate) async fn or_never<F: std::future::Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
