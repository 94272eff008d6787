//! What the transports that may move a session's commands off QUIC share
//! ([`super::rdma`], [`super::shm_commands`]): the path the attachment's
//! first read chose, and when such an attachment has ended. QUIC stays the
//! control connection of both.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;

/// Where a session's commands go.
#[derive(Debug)]
pub(crate) enum Path<A> {
    /// Not decided yet: the first read decides.
    Pending,
    Quic,
    /// The path beside QUIC (an RDMA connection, a command ring).
    Beside(Arc<A>),
}

impl<A> Clone for Path<A> {
    fn clone(&self) -> Self {
        match self {
            Path::Pending => Path::Pending,
            Path::Quic => Path::Quic,
            Path::Beside(a) => Path::Beside(a.clone()),
        }
    }
}

/// A path beside QUIC, once chosen.
pub(crate) trait Beside: Send + Sync + 'static {
    /// How the path ended.
    type Ended: Send + Sync + 'static;
    /// How the path ended (`None` while it is up), set by its thread.
    fn ended(&self) -> &watch::Receiver<Option<Self::Ended>>;
    /// Set when the session stopped the path itself (it moves): its end is
    /// then not the attachment's (QUIC's close is).
    fn stopped(&self) -> &AtomicBool;
}

/// The path beside QUIC when the first read chose it.
pub(crate) fn chosen<A>(path: &watch::Receiver<Path<A>>) -> Option<Arc<A>> {
    match &*path.borrow() {
        Path::Beside(a) => Some(a.clone()),
        _ => None,
    }
}

/// Completes once the attachment has ended: its QUIC connection closed, or
/// the path beside it, once chosen, ended other than by the session's own
/// stop (then the replies still queued go where the session moves).
pub(crate) async fn ended<A: Beside>(quic: quinn::Connection, mut path: watch::Receiver<Path<A>>) {
    let beside = async move {
        // Called before the first read decides (the reply writer's copy):
        // the path counts once it was chosen.
        let _ = path.wait_for(|p| !matches!(p, Path::Pending)).await;
        match chosen(&path) {
            Some(a) => {
                let _ = a.ended().clone().wait_for(Option::is_some).await;
                if a.stopped().load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = quic.closed() => {}
        () = beside => {}
    }
}
