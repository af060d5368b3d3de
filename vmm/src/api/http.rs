//! One HTTP/1.1 request read from a connection, within limits, and one response written
//! back. The head is parsed by `httparse` (hyper's parser); what this module adds is the
//! bounds: a head of at most [`HEAD_LIMIT`] bytes and [`MAX_HEADERS`] headers, a body of at
//! most [`BODY_LIMIT`] bytes sent with `Content-Length`, and a client that stalls for
//! [`IO_TIMEOUT`] loses its connection with `408`. Every refusal is a status code and a
//! reason, answered as JSON by the caller; nothing here panics on what a client sends.

use std::io::{self, Read, Write};
use std::time::Duration;

/// The most bytes of a request's line and headers.
pub const HEAD_LIMIT: usize = 16 * 1024;
/// The most headers.
pub const MAX_HEADERS: usize = 32;
/// The largest body.
pub const BODY_LIMIT: usize = 64 * 1024;
/// How long a client may leave the connection silent while sending or receiving.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A request as read: its method, its target (path and query) and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target, e.g. `/api/v1/interrupts/table?present=true`.
    pub target: String,
    /// The body (empty without one).
    pub body: Vec<u8>,
}

/// A request refused before it was understood: the status to answer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// Why, for the JSON error.
    pub message: String,
}

impl Refusal {
    /// A refusal with `status` and `message`.
    #[must_use]
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// What the bytes received so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// A whole head of `head_len` bytes announcing a body of `body_len` bytes.
    Head {
        /// The method.
        method: String,
        /// The request target.
        target: String,
        /// Bytes of the head, the blank line included.
        head_len: usize,
        /// `Content-Length` (0 without it).
        body_len: usize,
    },
}

/// Parses the head at the start of `bytes` (which may hold part of the body too).
///
/// # Errors
/// `400` for a malformed head, `431` for one too large or with too many headers, `411`
/// for a chunked body, `413` for a body over [`BODY_LIMIT`], `505` for an HTTP version
/// other than 1.x.
pub fn parse_head(bytes: &[u8]) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if bytes.len() >= HEAD_LIMIT => {
            return Err(Refusal::new(
                431,
                format!("the request's head is over {HEAD_LIMIT} bytes"),
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                431,
                format!("more than {MAX_HEADERS} headers"),
            ))
        }
        Err(e) => return Err(Refusal::new(400, format!("malformed request: {e}"))),
    };
    if head_len > HEAD_LIMIT {
        return Err(Refusal::new(
            431,
            format!("the request's head is over {HEAD_LIMIT} bytes"),
        ));
    }
    if request.version != Some(1) && request.version != Some(0) {
        return Err(Refusal::new(505, "only HTTP/1.x is served"));
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(Refusal::new(400, "malformed request line"));
    };
    let mut body_len = 0;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::new(
                411,
                "chunked bodies are not accepted: send Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| Refusal::new(400, "Content-Length is not a number"))?;
        }
    }
    if body_len > BODY_LIMIT {
        return Err(Refusal::new(
            413,
            format!("the body is over {BODY_LIMIT} bytes"),
        ));
    }
    Ok(Parsed::Head {
        method: method.to_string(),
        target: target.to_string(),
        head_len,
        body_len,
    })
}

/// Parses one whole request held in `bytes`: `Ok(None)` while it is incomplete.
///
/// # Errors
/// As [`parse_head`].
pub fn parse(bytes: &[u8]) -> Result<Option<Request>, Refusal> {
    match parse_head(bytes)? {
        Parsed::Partial => Ok(None),
        Parsed::Head {
            method,
            target,
            head_len,
            body_len,
        } => {
            let end = head_len.saturating_add(body_len);
            Ok(bytes.get(head_len..end).map(|body| Request {
                method,
                target,
                body: body.to_vec(),
            }))
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads one request from `stream` (whose read timeout the caller set).
///
/// # Errors
/// A [`Refusal`] to answer (`408` for a client that stalled), or `Ok(None)`-like
/// silence: a client that hung up before sending a whole head gets `400` (nobody reads
/// it).
pub fn read_request(stream: &mut impl Read) -> Result<Request, Refusal> {
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(request) = parse(&bytes)? {
            return Ok(request);
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(Refusal::new(400, "the request ended early")),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) => {
                return Err(Refusal::new(
                    408,
                    format!(
                        "the request did not arrive within {} s",
                        IO_TIMEOUT.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(Refusal::new(400, format!("cannot read the request: {e}"))),
        };
        bytes.extend_from_slice(chunk.get(..n).unwrap_or_default());
        // A head never needs more than the limit; a body never more than its length.
        if bytes.len() > HEAD_LIMIT + BODY_LIMIT {
            return Err(Refusal::new(413, "the request is too large"));
        }
    }
}

/// The reason phrase of the statuses this server answers.
#[must_use]
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes a whole response and closes the exchange (`Connection: close`).
///
/// # Errors
/// The stream's error (a client that went away).
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    if status != 204 {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_requests_parse_and_partial_ones_wait() {
        let text = b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n{}{}";
        let r = parse(text).unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.target.as_str(), r.body.as_slice()),
            ("PUT", "/api/v1/vm.snapshot", &b"{}{}"[..])
        );
        for cut in 0..text.len() {
            assert_eq!(parse(&text[..cut]).unwrap(), None, "{cut}");
        }
        let get = parse(b"GET /api/v1/vm.info HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(get.body.is_empty());
    }

    #[test]
    fn bad_large_and_chunked_requests_are_refused_with_their_status() {
        let status = |bytes: &[u8]| parse(bytes).unwrap_err().status;
        assert_eq!(status(b"GET\0 / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: lots\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        let big = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            BODY_LIMIT + 1
        );
        assert_eq!(status(big.as_bytes()), 413);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
        let mut long = b"GET /".to_vec();
        long.resize(HEAD_LIMIT + 10, b'a');
        assert_eq!(status(&long), 431);
    }

    #[test]
    fn a_stalled_or_short_client_is_refused() {
        struct Stalls;
        impl Read for Stalls {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        assert_eq!(read_request(&mut Stalls).unwrap_err().status, 408);
        let mut short = &b"PUT / HTTP/1.1\r\nContent-Length: 9\r\n\r\n{"[..];
        assert_eq!(read_request(&mut short).unwrap_err().status, 400);
        let mut whole = &b"GET /metrics HTTP/1.1\r\n\r\n"[..];
        assert_eq!(read_request(&mut whole).unwrap().target, "/metrics");
    }

    #[test]
    fn responses_carry_length_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 200, "application/json", b"{}").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 2\r\n") && text.ends_with("\r\n\r\n{}"));
        let mut out = Vec::new();
        write_response(&mut out, 204, "application/json", b"").unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("Content-Length"));
    }
}
