//! The control API (`--api-socket`, `docs/api.md`): HTTP/1.1 with JSON bodies on a Unix
//! socket, in the style of cloud-hypervisor's `/api/v1/...`, so `curl --unix-socket`
//! drives a running VM.
//!
//! One thread accepts connections; each connection gets a thread of its own (at most
//! [`MAX_CONNECTIONS`] at once: beyond, `503`), which reads one request within the limits
//! of [`http`], routes it ([`route`]) and hands it to the VM's supervising thread as a
//! [`VmEvent::Api`]. The supervisor answers from the VM's state (taking the interrupt
//! core's lock only to copy what it reports) and the connection thread writes the answer,
//! so no lock of the VM is held while a client is slow, and a client that stalls holds
//! only its own thread.
//!
//! The socket is made owner-only, and only a client with the server's user ID is served.
//! An existing path is never replaced: the socket is bound under a temporary name, made
//! owner-only, then linked to the path, which fails if anything is there. The path is
//! removed when the server stops, if it is still this server's socket.

pub mod client;
pub mod http;
pub mod route;

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vcpu::VmEvent;
use http::Refusal;
pub use route::ApiRequest;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection waits for the VM's answer (a snapshot of a large guest takes
/// the longest).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// An answer body.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// `application/json`.
    Json(serde_json::Value),
    /// `text/plain` (the Prometheus exposition format).
    Text(String),
    /// No body (`204`).
    Empty,
}

/// The VM's answer to a request.
pub type ApiReply = Result<Body, Refusal>;

/// A request on its way to the VM's supervisor, with where the answer goes.
#[derive(Debug, Clone)]
pub struct ApiCall {
    /// What is asked.
    pub request: ApiRequest,
    /// Where the answer goes (the connection's thread waits on it).
    pub reply: Sender<ApiReply>,
}

impl ApiCall {
    /// Answers the call; a client that gave up is not an error.
    pub fn answer(&self, reply: ApiReply) {
        let _ = self.reply.send(reply);
    }
}

impl PartialEq for ApiCall {
    fn eq(&self, other: &Self) -> bool {
        self.request == other.request
    }
}

impl Eq for ApiCall {}

/// A running API server. Stopping it (or dropping it) ends its accepting thread and
/// removes its socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    inode: (u64, u64),
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Something is at the path already.
    #[error("the API socket {} exists; remove it or choose another path (an existing path is never replaced)", .0.display())]
    Exists(PathBuf),
    /// The socket could not be made.
    #[error("cannot create the API socket {}", .path.display())]
    Socket {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Binds an owner-only listening socket at `path`, which must not exist.
fn bind_private(path: &Path) -> Result<UnixListener, ApiError> {
    let fail = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        return Err(ApiError::Exists(path.to_path_buf()));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let temp = path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let listener = UnixListener::bind(&temp).map_err(fail)?;
    let linked = fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::hard_link(&temp, path));
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ApiError::Exists(path.to_path_buf()))
        }
        Err(e) => Err(fail(e)),
    }
}

/// The user ID of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: `cred` and `len` are valid for writing and `len` is `cred`'s size; the
    // kernel writes at most that.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

impl ApiServer {
    /// Serves the API at `path`, sending what clients ask to `events`.
    ///
    /// # Errors
    /// [`ApiError::Exists`] if anything is at `path`; [`ApiError::Socket`] if the socket,
    /// its eventfd or its thread cannot be had.
    pub fn start(path: &Path, events: Sender<VmEvent>) -> Result<Self, ApiError> {
        let fail = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind_private(path)?;
        let meta = fs::symlink_metadata(path).map_err(fail)?;
        let server = (|| {
            listener.set_nonblocking(true)?;
            let wake = EventFd::new(EFD_NONBLOCK)?;
            let stop = wake.try_clone()?;
            let thread = crate::threads::spawn(
                crate::seccomp::ThreadKind::Api,
                "vmm-api".into(),
                move || accept_loop(&listener, &stop, &events),
            )?;
            Ok(Self {
                path: path.to_path_buf(),
                inode: (meta.dev(), meta.ino()),
                wake,
                thread: Some(thread),
            })
        })();
        server.map_err(|e| {
            let _ = fs::remove_file(path);
            fail(e)
        })
    }

    /// The socket's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket (connections being served finish on their
    /// own threads; the VM is gone, so they answer `503`).
    pub fn stop(&mut self) {
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for a connection or the stop eventfd; serves each connection on its own thread.
fn accept_loop(listener: &UnixListener, stop: &EventFd, events: &Sender<VmEvent>) {
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            log::error!("API socket: poll failed: {}", io::Error::last_os_error());
            return;
        }
        if fds.get(1).is_some_and(|f| f.revents != 0) {
            return;
        }
        while let Ok((stream, _)) = listener.accept() {
            serve_connection(stream, &busy, events);
        }
    }
}

fn serve_connection(mut stream: UnixStream, busy: &Arc<AtomicUsize>, events: &Sender<VmEvent>) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(http::IO_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(http::IO_TIMEOUT)));
    if setup.is_err() {
        return;
    }
    if peer_uid(&stream)
        != Some(
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() },
        )
    {
        respond(
            &mut stream,
            Err(Refusal::new(403, "only the VMM's own user may connect")),
        );
        return;
    }
    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        busy.fetch_sub(1, Ordering::AcqRel);
        respond(
            &mut stream,
            Err(Refusal::new(
                503,
                format!("{MAX_CONNECTIONS} requests are being served; try again"),
            )),
        );
        return;
    }
    let held = busy.clone();
    let busy = busy.clone();
    let events = events.clone();
    let spawned = crate::threads::spawn(
        crate::seccomp::ThreadKind::ApiConnection,
        "vmm-api-conn".into(),
        move || {
            let reply = http::read_request(&mut stream)
                .and_then(|r| route::route(&r.method, &r.target, &r.body))
                .and_then(|request| ask(request, &events));
            respond(&mut stream, reply);
            busy.fetch_sub(1, Ordering::AcqRel);
        },
    );
    if spawned.is_err() {
        // The closure (and its stream) is gone; the client sees the connection close.
        held.fetch_sub(1, Ordering::AcqRel);
        log::warn!("API socket: cannot start a thread for a connection");
    }
}

/// Hands `request` to the VM and waits for its answer.
fn ask(request: ApiRequest, events: &Sender<VmEvent>) -> ApiReply {
    if request == ApiRequest::Ping {
        return Ok(Body::Json(serde_json::json!({
            "vmm": "vmm",
            "version": env!("CARGO_PKG_VERSION"),
            "api": "v1",
        })));
    }
    let gone = || Refusal::new(503, "the VM is stopping");
    let (tx, rx) = mpsc::channel();
    events
        .send(VmEvent::Api(ApiCall { request, reply: tx }))
        .map_err(|_| gone())?;
    match rx.recv_timeout(ANSWER_TIMEOUT) {
        Ok(reply) => reply,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Refusal::new(
            503,
            format!(
                "the VM did not answer within {} s",
                ANSWER_TIMEOUT.as_secs()
            ),
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(gone()),
    }
}

fn respond(stream: &mut UnixStream, reply: ApiReply) {
    let written = match reply {
        Ok(Body::Json(value)) => {
            let mut text = serde_json::to_vec_pretty(&value).unwrap_or_default();
            text.push(b'\n');
            http::write_response(stream, 200, "application/json", &text)
        }
        Ok(Body::Text(text)) => http::write_response(
            stream,
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            text.as_bytes(),
        ),
        Ok(Body::Empty) => http::write_response(stream, 204, "application/json", b""),
        Err(refusal) => {
            let body = serde_json::json!({ "error": refusal.message });
            let mut text = serde_json::to_vec(&body).unwrap_or_default();
            text.push(b'\n');
            http::write_response(stream, refusal.status, "application/json", &text)
        }
    };
    // A client that went away is no one's problem.
    drop(written);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-api-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir.join("api.sock")
    }

    #[test]
    fn the_socket_is_owner_only_never_replaces_a_path_and_goes_away() {
        let path = temp("perm");
        fs::write(&path, b"precious").unwrap();
        let (tx, _rx) = mpsc::channel();
        assert!(matches!(
            ApiServer::start(&path, tx.clone()),
            Err(ApiError::Exists(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        fs::remove_file(&path).unwrap();
        let mut server = ApiServer::start(&path, tx).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers = fs::read_dir(path.parent().unwrap()).unwrap().count();
        assert_eq!(leftovers, 1, "only the socket, no temporary name");
        server.stop();
        path.symlink_metadata().unwrap_err();
    }

    #[test]
    fn requests_reach_the_vm_and_refusals_are_json() {
        let path = temp("serve");
        let (tx, rx) = mpsc::channel();
        let server = ApiServer::start(&path, tx).unwrap();
        let vm = std::thread::spawn(move || {
            while let Ok(VmEvent::Api(call)) = rx.recv() {
                let body = serde_json::json!({ "asked": format!("{:?}", call.request) });
                call.answer(Ok(Body::Json(body)));
            }
        });
        let (status, body) = client::request(&path, "GET", "/api/v1/vm.info", None).unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("Info"), "{body}");
        let (status, body) = client::request(&path, "GET", "/api/v1/nope", None).unwrap();
        assert_eq!(status, 404);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("no endpoint"),
            "{body}"
        );
        let (status, _) = client::request(&path, "PUT", "/api/v1/vm.snapshot", Some("{")).unwrap();
        assert_eq!(status, 400);
        drop(server);
        vm.join().unwrap();
    }
}
