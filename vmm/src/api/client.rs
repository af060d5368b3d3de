//! `vmm api SOCKET PATH [JSON]`: one request to a control API, for people without curl
//! (and for tests). The response is read whole (the server closes each exchange) and its
//! head parsed by `httparse`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The largest response read (a whole 65,536-entry table fits).
const RESPONSE_LIMIT: u64 = 64 << 20;

/// Sends `method target` with `body` (JSON) to the API at `socket`; returns the status and
/// the response body.
///
/// # Errors
/// The socket's error, or `InvalidData` for a response that is not HTTP.
pub fn request(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(super::ANSWER_TIMEOUT + super::http::IO_TIMEOUT))?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut bytes = Vec::new();
    stream.take(RESPONSE_LIMIT).read_to_end(&mut bytes)?;
    parse_response(&bytes)
}

/// The status and body of a whole response.
fn parse_response(bytes: &[u8]) -> io::Result<(u16, String)> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(invalid("the response ended early")),
        Err(e) => return Err(invalid(&format!("not an HTTP response: {e}"))),
    };
    let status = response.code.ok_or_else(|| invalid("no status"))?;
    let body = bytes.get(head_len..).unwrap_or_default();
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_split_into_status_and_body() {
        let (s, b) =
            parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_str()), (404, "{}"));
        parse_response(b"HTTP/1.1 200").unwrap_err();
        parse_response(b"garbage\r\n\r\n").unwrap_err();
    }
}
