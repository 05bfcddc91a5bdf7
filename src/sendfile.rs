//! Cached answers sent with `sendfile(2)`, without copying their bodies into the socket.
//!
//! Writing a body to a TCP socket copies it into the kernel's buffers. For a cached answer
//! that copy is a large part of what serving it costs: a quarter of the proxy's CPU per answer
//! for a 50-lead page, more for larger pages (38 % at 250 leads). nginx's `proxy_cache` avoids it by `sendfile`-ing its
//! cache file, and so does the proxy here:
//! - an answer the cache stores whose body is at least `--sendfile-min-bytes` also gets a
//!   [`Mirror`]: the body written once into a memfd (a file in memory), sealed so that it can
//!   never change again;
//! - every client connection is served through a [`Stream`]. When hyper asks it to write a
//!   buffer that lies within a mirrored body, it sends those bytes from the memfd with
//!   `sendfile`, after the bytes before them (the response head) sent with `MSG_MORE` so that
//!   both leave in the same segments.
//!
//! **Why an address identifies the bytes.** hyper hands the body's `Bytes` to the socket as
//! they are (a vectored write does not copy them), so a write of a mirrored body is a buffer
//! within its address range. A mirror holds a clone of the body's `Bytes`, and `Bytes` are
//! immutable: while a mirror is registered, its range can be neither freed, nor reused, nor
//! changed, so a buffer within it holds exactly the memfd's bytes at the same offset. A mirror
//! leaves the registry when the cache drops it, before its clone of the body goes; a write
//! that finds no mirror is the ordinary copying write.
//!
//! **The price.** A mirrored body is held twice, once for hyper and once for the kernel, and
//! the cache counts it twice against `--cache-max-bytes`. Each mirror holds a file
//! descriptor; mirrors use at most a quarter of the process's descriptor limit, and an answer
//! stored beyond that is served by copying.

use std::collections::btree_map::{BTreeMap, Entry as Slot};
use std::fmt;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A cached body also held in a sealed memfd, from which connections `sendfile` it.
pub struct Mirror {
    /// A clone of the body: keeps its address range alive and unchanged while registered.
    body: Bytes,
    #[cfg(target_os = "linux")]
    file: std::fs::File,
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("len", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// The mirrors alive, by the address their body starts at.
struct Registry {
    by_start: RwLock<BTreeMap<usize, Weak<Mirror>>>,
    /// Mirrors alive (registered or not): checked before any lookup, and against `limit`.
    alive: AtomicUsize,
    /// The most mirrors (file descriptors) at once.
    limit: usize,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry {
    by_start: RwLock::default(),
    alive: AtomicUsize::new(0),
    limit: descriptor_budget(),
});

/// A quarter of the soft limit on open descriptors: the rest stays for connections.
#[cfg(target_os = "linux")]
fn descriptor_budget() -> usize {
    use rustix::process::{getrlimit, Resource};
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    usize::try_from(soft / 4).unwrap_or(usize::MAX)
}

#[cfg(not(target_os = "linux"))]
fn descriptor_budget() -> usize {
    0
}

impl Mirror {
    /// Mirrors `body` and registers it, or `None` when no descriptor is left for it, the memfd
    /// cannot be made, or the body is mirrored already. An answer without a mirror is served
    /// by copying, as it would be anyway.
    #[cfg(target_os = "linux")]
    pub fn new(body: &Bytes) -> Option<Arc<Mirror>> {
        let registry = &*REGISTRY;
        if body.is_empty() {
            return None;
        }
        if registry.alive.fetch_add(1, Ordering::AcqRel) >= registry.limit {
            registry.alive.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let file = match sealed_copy(body) {
            Ok(file) => file,
            Err(e) => {
                registry.alive.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(error = %e, "no memfd for a cached body; it is sent by copying");
                return None;
            }
        };
        // From here the mirror exists, and its drop gives its place in `alive` back.
        let mirror = Arc::new(Mirror {
            body: body.clone(),
            file,
        });
        let registered = {
            let mut by_start = registry.by_start.write().unwrap_or_else(|p| p.into_inner());
            match by_start.entry(mirror.start()) {
                Slot::Occupied(other) if other.get().strong_count() > 0 => false,
                Slot::Occupied(mut stale) => {
                    stale.insert(Arc::downgrade(&mirror));
                    true
                }
                Slot::Vacant(slot) => {
                    slot.insert(Arc::downgrade(&mirror));
                    true
                }
            }
        };
        // A refused mirror is dropped here, once the lock its drop takes is released.
        registered.then_some(mirror)
    }

    /// Never a mirror: `sendfile` of cached bodies is built on Linux only.
    #[cfg(not(target_os = "linux"))]
    pub fn new(_body: &Bytes) -> Option<Arc<Mirror>> {
        None
    }

    /// The bytes it holds.
    pub(crate) fn len(&self) -> usize {
        self.body.len()
    }

    fn start(&self) -> usize {
        self.body.as_ptr() as usize
    }

    /// The mirror whose body holds `buf`, and where in it `buf` starts.
    fn holding(buf: &[u8]) -> Option<(Arc<Mirror>, usize)> {
        let registry = &*REGISTRY;
        if registry.alive.load(Ordering::Acquire) == 0 {
            return None;
        }
        let addr = buf.as_ptr() as usize;
        let by_start = registry.by_start.read().unwrap_or_else(|p| p.into_inner());
        let (start, mirror) = by_start.range(..=addr).next_back()?;
        let mirror = mirror.upgrade()?;
        let offset = addr - start;
        (offset + buf.len() <= mirror.len()).then_some((mirror, offset))
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let registry = &*REGISTRY;
        {
            let mut by_start = registry.by_start.write().unwrap_or_else(|p| p.into_inner());
            let start = self.start();
            // Only this mirror's own registration: another body may not share its start while
            // this one lives, but a mirror refused as a duplicate was never registered.
            if by_start
                .get(&start)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self))
            {
                by_start.remove(&start);
            }
        }
        registry.alive.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `body` in a new memfd, sealed against any change.
#[cfg(target_os = "linux")]
fn sealed_copy(body: &[u8]) -> io::Result<std::fs::File> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    use std::io::Write;
    let fd = memfd_create(
        "kommo-fanout-answer",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(body)?;
    fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    Ok(file)
}

/// How a connection's writes use the mirrors.
#[derive(Debug, Clone, Default)]
pub struct Sends {
    /// The smallest buffer looked up among the mirrors; 0 (the default) looks up none.
    pub min: usize,
    /// Counts the bytes sent from mirrors.
    pub bytes: Counter,
}

/// A client connection: reads and small writes go straight to the socket; a write of a
/// mirrored body of at least `sends.min` bytes is sent from its memfd.
pub struct Stream {
    tcp: TcpStream,
    sends: Sends,
    /// A mirrored body not sent in whole yet: its mirror, and the address of its next byte.
    /// The next write that starts there goes on from the memfd even when what is left is
    /// under the minimum.
    resume: Option<(Arc<Mirror>, usize)>,
}

impl Stream {
    pub fn new(tcp: TcpStream, sends: Sends) -> Stream {
        Stream {
            tcp,
            sends,
            resume: None,
        }
    }

    /// The mirror and offset of `first` when it goes on with the body left in `resume`.
    fn resumed(&mut self, first: Option<&IoSlice<'_>>) -> Option<(Arc<Mirror>, usize)> {
        let (mirror, at) = self.resume.take()?;
        // Not empty: a send of nothing would read as a closed socket.
        let first = first.filter(|b| !b.is_empty())?;
        let offset = at.checked_sub(mirror.start())?;
        (first.as_ptr() as usize == at && offset + first.len() <= mirror.len())
            .then_some((mirror, offset))
    }

    /// `head` then the mirrored `len` bytes at `offset` of `mirror`, as far as the socket
    /// takes them now.
    #[cfg(target_os = "linux")]
    fn poll_send_mirrored(
        &mut self,
        cx: &mut Context<'_>,
        head: &[IoSlice<'_>],
        mirror: Arc<Mirror>,
        offset: usize,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        use rustix::io::Errno;
        use rustix::net::{sendmsg, SendFlags};
        let head_len: usize = head.iter().map(|b| b.len()).sum();
        let body_at = mirror.start() + offset;
        loop {
            if self.tcp.poll_write_ready(cx)?.is_pending() {
                self.resume = Some((mirror, body_at));
                return Poll::Pending;
            }
            let sent = self.tcp.try_io(tokio::io::Interest::WRITABLE, || {
                let mut sent = 0;
                if head_len > 0 {
                    let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
                    sent = sendmsg(&self.tcp, head, &mut Default::default(), flags)?;
                    if sent < head_len {
                        return Ok(sent);
                    }
                }
                let mut at = offset as u64;
                match rustix::fs::sendfile(&self.tcp, &mirror.file, Some(&mut at), len) {
                    Ok(n) => Ok(sent + n),
                    // The head went: report it, and the body waits for the next write.
                    Err(Errno::AGAIN) if sent > 0 => Ok(sent),
                    Err(e) => Err(e.into()),
                }
            });
            match sent {
                Ok(n) => {
                    let body_sent = n.saturating_sub(head_len);
                    if body_sent > 0 {
                        self.sends.bytes.inc_by(body_sent as u64);
                    }
                    if body_sent < len {
                        self.resume = Some((mirror, body_at + body_sent));
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        #[cfg(target_os = "linux")]
        if self.sends.min > 0 {
            let this = &mut *self;
            if let Some((mirror, offset)) = this.resumed(bufs.first()) {
                return this.poll_send_mirrored(cx, &[], mirror, offset, bufs[0].len());
            }
            if let Some(i) = bufs.iter().position(|b| b.len() >= this.sends.min) {
                if let Some((mirror, offset)) = Mirror::holding(&bufs[i]) {
                    return this.poll_send_mirrored(cx, &bufs[..i], mirror, offset, bufs[i].len());
                }
            }
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn body(len: usize, seed: u8) -> Bytes {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn a_slice_of_a_mirrored_body_is_found_at_its_offset_and_nothing_else_is() {
        let all = body(64 * 1024, 1);
        let part = all.slice(1000..40_000);
        let mirror = Mirror::new(&part).expect("a mirror");
        assert_eq!(mirror.len(), part.len());

        let (found, offset) = Mirror::holding(&part[500..3000]).expect("within the body");
        assert!(Arc::ptr_eq(&found, &mirror));
        assert_eq!(offset, 500);
        let (_, offset) = Mirror::holding(&part).expect("the whole body");
        assert_eq!(offset, 0);

        // Same allocation, but reaching out of the mirrored range at either end.
        assert!(Mirror::holding(&all[500..3000]).is_none(), "starts before");
        assert!(
            Mirror::holding(&all[30_000..45_000]).is_none(),
            "ends after"
        );
        // Equal bytes elsewhere are not the body.
        let copy = Bytes::copy_from_slice(&part);
        assert!(Mirror::holding(&copy).is_none());

        drop((found, mirror));
        assert!(Mirror::holding(&part).is_none(), "gone with its mirror");
    }

    #[test]
    fn a_body_is_mirrored_once_and_a_refused_mirror_leaves_the_first_registered() {
        let b = body(20_000, 2);
        let first = Mirror::new(&b).expect("a mirror");
        assert!(Mirror::new(&b.clone()).is_none(), "already mirrored");
        let (found, _) = Mirror::holding(&b).expect("still registered");
        assert!(Arc::ptr_eq(&found, &first));
        assert!(Mirror::new(&Bytes::new()).is_none(), "nothing to mirror");
    }

    #[test]
    fn the_memfd_holds_the_body_and_refuses_changes() {
        let b = body(50_000, 3);
        let mirror = Mirror::new(&b).expect("a mirror");
        let mut read = vec![0u8; b.len()];
        std::os::unix::fs::FileExt::read_exact_at(&mirror.file, &mut read, 0).expect("read");
        assert!(read == b, "the memfd holds the body");
        let mut file = mirror.file.try_clone().expect("dup");
        let err = file.write_all(b"x").expect_err("sealed");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::PERM.raw_os_error())
        );
        assert!(file.set_len(1).is_err(), "cannot shrink");
    }

    /// Writes `bufs` as hyper does: vectored, advancing past what each write took. Returns
    /// how many writes that took.
    async fn write_all_vectored(stream: &mut Stream, bufs: &[&[u8]]) -> usize {
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut writes = 0;
        while !rest.is_empty() {
            let n = stream.write_vectored(rest).await.expect("write");
            assert!(n > 0, "progress");
            IoSlice::advance_slices(&mut rest, n);
            writes += 1;
        }
        writes
    }

    /// Two answers (head, mirrored body, head, body not mirrored) written through a `Stream`
    /// to a reader slower than the socket: the reader gets exactly those bytes, and the
    /// counter exactly the mirrored body, its tail under the minimum included.
    #[tokio::test]
    async fn a_connection_sends_mirrored_bodies_from_the_memfd_and_others_by_copy() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        // Small socket buffers at both ends, so that sends are partial and would block.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(16 * 1024).expect("rcvbuf");
        let client = socket.connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        rustix::net::sockopt::set_socket_send_buffer_size(&server, 16 * 1024).expect("sndbuf");
        // A minimum above what the socket takes at once: the body's last parts are under it,
        // and go on from the memfd because they continue a mirrored body.
        let sends = Sends {
            min: 64 * 1024,
            bytes: Counter::default(),
        };
        let mut stream = Stream::new(server, sends.clone());

        let mirrored = body(1 << 20, 4);
        let mirror = Mirror::new(&mirrored).expect("a mirror");
        let plain = body(200_000, 5);
        let (head1, head2) = (
            b"HTTP/1.1 200 OK\r\n\r\n".as_slice(),
            b"second head".as_slice(),
        );
        let want = [head1, &mirrored[..], head2, &plain[..]].concat();

        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            loop {
                let n = client.read(&mut chunk).await.expect("read");
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
        });
        let writes = write_all_vectored(&mut stream, &[head1, &mirrored, head2, &plain]).await;
        assert!(
            writes > 3,
            "the mirrored body went in parts ({writes} writes)"
        );
        stream.shutdown().await.expect("shutdown");
        let got = reader.await.expect("reader");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the bytes arrive as written");
        assert_eq!(sends.bytes.get(), mirrored.len() as u64);
        drop(mirror);
    }

    #[tokio::test]
    async fn without_a_minimum_nothing_is_looked_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("bound"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let sends = Sends::default();
        let mut stream = Stream::new(server, sends.clone());
        let b = body(100_000, 6);
        let _mirror = Mirror::new(&b).expect("a mirror");
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read");
            got
        });
        write_all_vectored(&mut stream, &[b"head", &b]).await;
        stream.shutdown().await.expect("shutdown");
        let got = reader.await.expect("reader");
        assert!(
            got == [b"head".as_slice(), &b].concat(),
            "the bytes arrive as written"
        );
        assert_eq!(sends.bytes.get(), 0);
    }
}
