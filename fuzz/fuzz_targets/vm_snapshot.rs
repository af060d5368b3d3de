//! Reading a snapshot file someone may have tampered with: the preamble and header parser
//! (magic, version, lengths, JSON of every layer, the machine settings and the cross
//! checks). With a first byte of 0 the input is the whole file; otherwise the rest is the
//! header behind a valid preamble, so the fuzzer works on the JSON. Either it is refused
//! with an error, or what it parsed serializes and parses again to the same header.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::{parse_header, FORMAT_VERSION, MAGIC};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode == 0 {
        rest.to_vec()
    } else {
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        file.extend_from_slice(rest);
        file
    };
    if let Ok((snap, _)) = parse_header(&file) {
        let header = serde_json::to_vec(&snap).expect("a parsed snapshot serializes");
        let mut again = file[..16].to_vec();
        again.extend_from_slice(&(header.len() as u64).to_le_bytes());
        again.extend_from_slice(&header);
        let (twice, _) = parse_header(&again).expect("a parsed snapshot parses again");
        assert_eq!(
            serde_json::to_vec(&twice).expect("serializes"),
            header,
            "a round trip changed the header"
        );
    }
});
