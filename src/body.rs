//! The one body type the proxy sends and answers with, and small constructors for it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Errors a body can fail with while streaming.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boxed body: buffered answers, streamed pass-through bodies and empty bodies alike.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    boxed(Full::new(bytes.into()))
}

/// An empty body.
pub fn empty() -> ProxyBody {
    boxed(Empty::<Bytes>::new())
}

/// A request body cut off past `max` bytes: the stream fails and `exceeded` is set, so the
/// caller can answer `413` instead of a gateway error.
pub struct CappedBody<B> {
    inner: B,
    seen: u64,
    max: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> CappedBody<B> {
    /// Wraps `inner`; the flag tells afterwards whether the cap was hit.
    pub fn new(inner: B, max: u64) -> (Self, Arc<AtomicBool>) {
        let exceeded = Arc::new(AtomicBool::new(false));
        let body = CappedBody {
            inner,
            seen: 0,
            max,
            exceeded: exceeded.clone(),
        };
        (body, exceeded)
    }
}

impl<B> http_body::Body for CappedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
            this.seen += data.len() as u64;
            if this.seen > this.max {
                this.exceeded.store(true, Ordering::Release);
                let error = format!("the request body is larger than {} bytes", this.max);
                return Poll::Ready(Some(Err(error.into())));
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A whole answer in memory: what the upstream sent, what the cache holds, what a merge renders.
#[derive(Debug, Clone)]
pub struct Buffered {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}
