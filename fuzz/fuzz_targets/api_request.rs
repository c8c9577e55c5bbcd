//! The local API's request path as moatd runs it: bytes from the socket, framed into lines by
//! `moat_api::framing::read_request_line` with a bound, each line decoded as a `HostRequest`
//! or a `Request`.
//!
//! The first input byte picks the line limit and the reader's buffer size (small ones, so that
//! lines cross buffer refills and the limit is reached often); the rest is the byte stream.
//!
//! Properties: nothing panics; framing agrees with a plain model (split at newlines; a line
//! over the limit ends the connection; a line that is not UTF-8 is refused and the next one
//! still reads; an unterminated last line counts); a too-long line is refused having taken at
//! most the limit plus one buffer from the stream, which is the memory bound moatd relies on;
//! a line decodes as at most one of the two request types, and a decoded request encodes to
//! one line that decodes to the same request.

#![no_main]

use std::io::{BufReader, Read};

use libfuzzer_sys::fuzz_target;
use moat_api::{
    HostRequest, Request,
    framing::{FramingError, read_request_line},
};

/// Counts what the framing took from the stream.
struct Counting<'a> {
    data: &'a [u8],
    taken: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len() - self.taken);
        buf[..n].copy_from_slice(&self.data[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

#[derive(Debug, PartialEq)]
enum Framed {
    Line(String),
    NotUtf8,
    TooLong,
}

/// What the framing must return for `data`, read line by line until EOF or a too-long line.
fn model(data: &[u8], limit: usize) -> Vec<Framed> {
    let mut out = Vec::new();
    let mut segments: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    // A trailing newline (or empty input) leaves an empty last segment that is no line.
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    for segment in segments {
        if segment.len() > limit {
            out.push(Framed::TooLong);
            return out;
        }
        out.push(match std::str::from_utf8(segment) {
            Ok(line) => Framed::Line(line.to_string()),
            Err(_) => Framed::NotUtf8,
        });
    }
    out
}

fn decode(line: &str) {
    let host = serde_json::from_str::<HostRequest>(line).ok();
    let request = serde_json::from_str::<Request>(line).ok();
    assert!(
        host.is_none() || request.is_none(),
        "one line decodes as both request kinds: {line:?}"
    );
    if let Some(host) = host {
        let encoded = serde_json::to_string(&host).expect("a HostRequest encodes");
        assert!(!encoded.contains('\n'));
        assert_eq!(serde_json::from_str::<HostRequest>(&encoded).unwrap(), host);
        // What the server does with it must be a valid request too.
        let _ = host.unregister();
    }
    if let Some(request) = request {
        let encoded = serde_json::to_string(&request).expect("a Request encodes");
        assert!(!encoded.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&encoded).unwrap(), request);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let limit = match selector & 0x0f {
        0 => moat_api::framing::MAX_REQUEST_LINE_BYTES,
        n => usize::from(n) * 7,
    };
    let capacity = usize::from(selector >> 4) + 1;
    let mut source = Counting {
        data: stream,
        taken: 0,
    };
    let expected = model(stream, limit);
    let mut got = Vec::new();
    {
        let mut reader = BufReader::with_capacity(capacity, &mut source);
        loop {
            let before = reader.get_ref().taken - reader.buffer().len();
            match read_request_line(&mut reader, limit) {
                Ok(Some(line)) => {
                    assert!(line.len() <= limit);
                    decode(&line);
                    got.push(Framed::Line(line));
                }
                Ok(None) => break,
                Err(FramingError::NotUtf8) => got.push(Framed::NotUtf8),
                Err(FramingError::TooLong { limit: l }) => {
                    assert_eq!(l, limit);
                    let taken = reader.get_ref().taken - before;
                    assert!(
                        taken <= limit + capacity,
                        "took {taken} bytes for a line over {limit}"
                    );
                    got.push(Framed::TooLong);
                    break;
                }
                Err(e) => panic!("a byte slice cannot time out or fail: {e}"),
            }
        }
    }
    assert_eq!(got, expected);
});
