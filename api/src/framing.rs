//! Request framing on the local API: one request per line, read with a bound.
//!
//! moatd reads untrusted bytes from its socket (any root process, and before the peer check
//! any process that can reach the socket), so a request line is read with a hard size limit
//! and never buffered past it: memory per connection stays at most the limit plus the
//! reader's buffer, whatever the client sends. The reader is generic (any [`BufRead`]) so that
//! unit tests and fuzz targets drive exactly the code moatd runs.

use std::io::{BufRead, ErrorKind};

/// The longest request line moatd accepts, in bytes, without its newline.
///
/// Requests are small JSON objects: the largest, `register`, carries a container id, a netns
/// path (at most `PATH_MAX`, 4 KiB), a pod name and namespace (253 and 63 bytes), an interface
/// name and a few addresses, about 5 KiB even if a path is 4 KiB long; JSON escapes could at
/// worst multiply string bytes by six. 64 KiB leaves that headroom and keeps the worst case of
/// a full connection table small (256 connections × 64 KiB = 16 MiB).
pub const MAX_REQUEST_LINE_BYTES: usize = 64 * 1024;

/// Why no request line could be read.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// The line reached the limit before its newline. Bytes past the limit were not read,
    /// so the stream is no longer at a line boundary: the caller should drop the connection.
    #[error("request line longer than {limit} bytes")]
    TooLong { limit: usize },
    /// The reader reported a timeout (a socket read timeout: `WouldBlock` or `TimedOut`)
    /// after `received` bytes of the line.
    #[error("no complete request line in time ({received} bytes received)")]
    TimedOut { received: usize },
    /// The line is not UTF-8 (JSON is).
    #[error("request line is not UTF-8")]
    NotUtf8,
    /// Any other read error (the peer reset the connection, ...).
    #[error("reading the request: {0}")]
    Io(#[source] std::io::Error),
}

/// Reads one request line of at most `limit` bytes (the newline not counted) from `reader`.
///
/// - `Ok(Some(line))`: a line, without its `\n`. A last line the peer ended with EOF instead of
///   a newline is returned too (as [`BufRead::lines`] does), so a client that half-closes its
///   side after an unterminated request is still answered.
/// - `Ok(None)`: EOF before any byte of a new line (the client is done).
/// - `Err(_)`: see [`FramingError`]. `Interrupted` reads are retried.
///
/// Never holds more than `limit` bytes of the line plus what `reader` buffers itself: the
/// excess of a too-long line is left unread, not collected.
pub fn read_request_line<R: BufRead + ?Sized>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<String>, FramingError> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(FramingError::TimedOut {
                    received: line.len(),
                });
            }
            Err(e) => return Err(FramingError::Io(e)),
        };
        if available.is_empty() {
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        let (content, used, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(newline) => (&available[..newline], newline + 1, true),
            None => (available, available.len(), false),
        };
        if line.len() + content.len() > limit {
            return Err(FramingError::TooLong { limit });
        }
        line.extend_from_slice(content);
        reader.consume(used);
        if complete {
            break;
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| FramingError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use std::io::{BufReader, Cursor, Read};

    use super::*;

    fn read_all(input: &[u8], limit: usize) -> Vec<Result<Option<String>, String>> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let next = read_request_line(&mut reader, limit);
            let done = !matches!(next, Ok(Some(_)));
            out.push(next.map_err(|e| e.to_string()));
            if done {
                return out;
            }
        }
    }

    #[test]
    fn lines_are_split_at_newlines_across_buffer_refills() {
        // A 4-byte buffer: every line spans several fill_buf calls.
        assert_eq!(
            read_all(b"{\"op\":\"status\"}\n\n{}\n", 64),
            vec![
                Ok(Some("{\"op\":\"status\"}".to_string())),
                Ok(Some(String::new())),
                Ok(Some("{}".to_string())),
                Ok(None),
            ]
        );
    }

    #[test]
    fn an_unterminated_last_line_is_returned_before_eof() {
        assert_eq!(
            read_all(b"a\nbc", 64),
            vec![Ok(Some("a".into())), Ok(Some("bc".into())), Ok(None)]
        );
        assert_eq!(read_all(b"", 64), vec![Ok(None)]);
    }

    #[test]
    fn a_line_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not() {
        let exact = format!("{}\n", "x".repeat(10));
        assert_eq!(
            read_all(exact.as_bytes(), 10),
            vec![Ok(Some("x".repeat(10))), Ok(None)]
        );
        let over = format!("{}\n", "x".repeat(11));
        let result = read_request_line(&mut BufReader::new(over.as_bytes()), 10);
        assert!(
            matches!(result, Err(FramingError::TooLong { limit: 10 })),
            "{result:?}"
        );
        // Unterminated and too long at EOF is too long as well.
        let result = read_request_line(&mut BufReader::new(&b"x".repeat(11)[..]), 10);
        assert!(matches!(result, Err(FramingError::TooLong { .. })));
    }

    /// A reader that yields `total` bytes of 'x' (no newline), counting what was taken: the
    /// proof that a too-long line is refused without reading it whole.
    struct Endless {
        total: usize,
        taken: usize,
    }

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.total - self.taken);
            buf[..n].fill(b'x');
            self.taken += n;
            Ok(n)
        }
    }

    #[test]
    fn a_too_long_line_is_refused_after_reading_at_most_the_limit_and_one_buffer() {
        let mut source = Endless {
            total: 200 << 20,
            taken: 0,
        };
        let mut reader = BufReader::with_capacity(8192, &mut source);
        let result = read_request_line(&mut reader, MAX_REQUEST_LINE_BYTES);
        assert!(matches!(result, Err(FramingError::TooLong { .. })));
        drop(reader);
        assert!(
            source.taken <= MAX_REQUEST_LINE_BYTES + 8192,
            "read {} bytes of a 200 MiB line",
            source.taken
        );
    }

    /// Replays a script of reads: data, or an error of one kind.
    struct Scripted(Vec<Result<&'static [u8], ErrorKind>>);

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            match self.0.remove(0) {
                Ok(data) => {
                    assert!(data.len() <= buf.len());
                    buf[..data.len()].copy_from_slice(data);
                    Ok(data.len())
                }
                Err(kind) => Err(kind.into()),
            }
        }
    }

    #[test]
    fn timeouts_report_what_was_received_and_interrupted_reads_are_retried() {
        for kind in [ErrorKind::WouldBlock, ErrorKind::TimedOut] {
            let mut reader = BufReader::new(Scripted(vec![Ok(b"{\"op\""), Err(kind)]));
            let result = read_request_line(&mut reader, 64);
            assert!(
                matches!(result, Err(FramingError::TimedOut { received: 5 })),
                "{kind:?}: {result:?}"
            );
        }
        let mut reader = BufReader::new(Scripted(vec![
            Ok(b"{\"op\""),
            Err(ErrorKind::Interrupted),
            Ok(b":\"ready\"}\n"),
        ]));
        assert_eq!(
            read_request_line(&mut reader, 64).unwrap().as_deref(),
            Some("{\"op\":\"ready\"}")
        );
        let mut reader = BufReader::new(Scripted(vec![Err(ErrorKind::ConnectionReset)]));
        let result = read_request_line(&mut reader, 64);
        assert!(
            matches!(&result, Err(FramingError::Io(e)) if e.kind() == ErrorKind::ConnectionReset),
            "{result:?}"
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_refused_and_the_next_line_still_reads() {
        let mut reader = Cursor::new(&b"\xff\xfe\n{}\n"[..]);
        assert!(matches!(
            read_request_line(&mut reader, 64),
            Err(FramingError::NotUtf8)
        ));
        assert_eq!(
            read_request_line(&mut reader, 64).unwrap().as_deref(),
            Some("{}")
        );
    }
}
