//! What a control-API client sends: any bytes as a request, read through the same reader
//! the server uses (in pieces, as a socket delivers them), then routed. Nothing may panic;
//! a refusal is a 4xx or 5xx, a request the reader takes fits the limits, and the router
//! answers every method and target it is given.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmm::api::http::{self, BODY_LIMIT};
use vmm::api::route;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bytes per read (0: whole).
    piece: u8,
    bytes: Vec<u8>,
}

/// Hands out `bytes` `piece` at a time, then end of file.
struct Pieces<'a> {
    bytes: &'a [u8],
    piece: usize,
}

impl std::io::Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.piece.min(buf.len()).min(self.bytes.len());
        let (now, rest) = self.bytes.split_at(n);
        buf[..n].copy_from_slice(now);
        self.bytes = rest;
        Ok(n)
    }
}

fuzz_target!(|input: Input| {
    let piece = if input.piece == 0 {
        usize::MAX
    } else {
        usize::from(input.piece)
    };
    let mut stream = Pieces {
        bytes: &input.bytes,
        piece,
    };
    match http::read_request(&mut stream) {
        Ok(request) => {
            assert!(request.body.len() <= BODY_LIMIT);
            if let Err(refusal) = route::route(&request.method, &request.target, &request.body) {
                assert!((400..500).contains(&refusal.status), "{refusal:?}");
            }
        }
        Err(refusal) => assert!((400..=505).contains(&refusal.status), "{refusal:?}"),
    }
});
