//! The smallest HTTP/1.1 response parser the load generators need: status, `content-length`
//! or chunked body, keep-alive. Pure functions over a buffer, shared by the async (closed-loop)
//! and the blocking (open-loop) clients.

use std::io;

/// The request every client sends (GET, keep-alive).
pub fn get_request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-bench\r\nAccept: */*\r\n\r\n")
        .into_bytes()
}

/// A POST with a JSON body.
pub fn post_request(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mesh-bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A complete response at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub status: u16,
    /// Bytes of the buffer the response takes (head and body).
    pub len: usize,
    /// The server said `Connection: close`.
    pub close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// `Ok(None)` while the response is incomplete.
pub fn parse(buf: &[u8]) -> io::Result<Option<Parsed>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(bad("response head too large"));
        }
        return Ok(None);
    };
    let head = &buf[..head_end];
    if head.len() < 12 || !head.starts_with(b"HTTP/1.") {
        return Err(bad("not an HTTP/1 response"));
    }
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("bad status"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    let body_start = head_end + 4;
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let len = if no_body {
        body_start
    } else if chunked {
        match chunked_len(&buf[body_start..])? {
            Some(n) => body_start + n,
            None => return Ok(None),
        }
    } else {
        match content_length {
            Some(n) => body_start + n,
            None => return Err(bad("response without length (close-delimited)")),
        }
    };
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some(Parsed { status, len, close }))
}

/// Length of a complete chunked body (trailers included), `None` if incomplete.
fn chunked_len(b: &[u8]) -> io::Result<Option<usize>> {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&b[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = &b[pos..pos + eol];
        let size_hex = line.split(|&c| c == b';').next().unwrap_or(line);
        let size = std::str::from_utf8(size_hex)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or_else(|| bad("bad chunk size"))?;
        pos += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = find(&b[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if b.len() < pos + size + 2 {
            return Ok(None);
        }
        pos += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_and_chunked() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1";
        assert_eq!(
            parse(r).unwrap(),
            Some(Parsed {
                status: 200,
                len: 41,
                close: false
            })
        );
        assert_eq!(parse(&r[..40]).unwrap(), None);
        let c = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let p = parse(c).unwrap().unwrap();
        assert_eq!((p.status, p.len, p.close), (404, c.len(), true));
        assert_eq!(parse(&c[..c.len() - 1]).unwrap(), None);
        assert!(parse(b"SSH-2.0\r\n\r\n").is_err());
    }
}
