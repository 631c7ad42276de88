//! Proxy-socket request parsing: routing, the wait query and every POST body type, on
//! arbitrary bytes. The first byte chooses what is parsed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use queue_proto::items::ChangeRequest;
use queue_proto::proxy::{Endpoint, ModelRequest, OutboxNotice, parse_body, parse_wait_query};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 5 {
        0 => {
            let _ = parse_body::<ModelRequest>(body);
        }
        1 => {
            let _ = parse_body::<OutboxNotice>(body);
        }
        2 => {
            let _ = parse_body::<ChangeRequest>(body);
        }
        3 => {
            if let Ok(q) = std::str::from_utf8(body) {
                let _ = parse_wait_query(q);
            }
        }
        _ => {
            if let Ok(line) = std::str::from_utf8(body) {
                let (method, path) = line.split_once(' ').unwrap_or((line, ""));
                if let Some(e) = Endpoint::route(method, path) {
                    assert!(e.max_body_bytes() <= 1024 * 1024);
                }
            }
        }
    }
});
