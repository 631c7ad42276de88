//! What a file the person sent is, decided from its bytes alone (a name or a declared
//! type says nothing), the limits every channel's files are held to, and the fixed
//! notices a refused file gets.

use queue_proto::items::AttachmentKind;

use crate::config::Config;

/// Fixed notices for files. None of them names the file.
pub mod notice {
    pub const FILE_TOO_LARGE: &str = "That file is larger than the assistant accepts; it was not \
        passed on.";
    pub const FILE_NOT_ACCEPTED: &str = "That file is not a kind the assistant accepts (photos: \
        JPEG, PNG, WebP; documents: PDF or plain text; voice notes); it was not passed on.";
    pub const FILE_NOT_FETCHED: &str = "That file could not be fetched from the chat app; it was \
        not passed on. Please send it again.";
    pub const TOO_MANY_FILES: &str = "That message has more files than the assistant accepts at \
        once; it was not passed on.";
    pub const FILES_OVER_BUDGET: &str = "Today's allowance of files for this conversation is \
        used up; that file was not passed on. Please send it again tomorrow.";
    pub const NO_TRANSCRIPTION: &str = "Voice notes cannot be understood here: no transcription \
        service is set up. Please write instead.";
}

/// What fetching a file found.
#[derive(Debug, Clone)]
pub enum Fetched {
    Ready {
        kind: AttachmentKind,
        media_type: &'static str,
        data: Vec<u8>,
    },
    /// Never passed on; `notice` is what the person is told.
    Refused {
        reason: String,
        notice: &'static str,
    },
}

/// The media type and kind of `bytes`, if it is one the assistant accepts: JPEG, PNG
/// and WebP images, PDF, plain UTF-8 text (Markdown included), Ogg audio.
pub fn sniff(bytes: &[u8]) -> Option<(&'static str, AttachmentKind)> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    if starts(b"\xff\xd8\xff") {
        return Some(("image/jpeg", AttachmentKind::Photo));
    }
    if starts(b"\x89PNG\r\n\x1a\n") {
        return Some(("image/png", AttachmentKind::Photo));
    }
    if bytes.len() >= 12 && starts(b"RIFF") && &bytes[8..12] == b"WEBP" {
        return Some(("image/webp", AttachmentKind::Photo));
    }
    if starts(b"%PDF-") {
        return Some(("application/pdf", AttachmentKind::Document));
    }
    if starts(b"OggS") {
        return Some(("audio/ogg", AttachmentKind::Voice));
    }
    // Text: UTF-8 throughout, and no control characters but tab, line breaks and
    // form feed (an archive or executable has them within its first bytes).
    let text = std::str::from_utf8(bytes).ok()?;
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r' | '\x0c'));
    plain.then_some(("text/plain", AttachmentKind::Document))
}

pub use queue_proto::items::MAX_PHOTO_BYTES;

/// The verdict on fetched `bytes` under `config`'s limits.
pub fn check(bytes: Vec<u8>, config: &Config) -> Fetched {
    if bytes.len() as u64 > config.attachments.max_bytes {
        return too_large(bytes.len() as u64);
    }
    let Some((media_type, kind)) = sniff(&bytes) else {
        return Fetched::Refused {
            reason: "not an accepted kind of file (by its bytes)".into(),
            notice: notice::FILE_NOT_ACCEPTED,
        };
    };
    if kind == AttachmentKind::Photo && bytes.len() as u64 > MAX_PHOTO_BYTES {
        return too_large(bytes.len() as u64);
    }
    if kind == AttachmentKind::Voice && config.transcription.is_none() {
        return Fetched::Refused {
            reason: "a voice note, and no transcription is set up".into(),
            notice: notice::NO_TRANSCRIPTION,
        };
    }
    Fetched::Ready {
        kind,
        media_type,
        data: bytes,
    }
}

/// The refusal of a file of `bytes` bytes (or declared so).
pub fn too_large(bytes: u64) -> Fetched {
    Fetched::Refused {
        reason: format!("{bytes} bytes, over the limit"),
        notice: notice::FILE_TOO_LARGE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_decide_never_the_name() {
        assert_eq!(sniff(b"\xff\xd8\xff\xe0rest").unwrap().0, "image/jpeg");
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n....").unwrap().0, "image/png");
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 ").unwrap().0, "image/webp");
        assert_eq!(sniff(b"%PDF-1.7\n").unwrap().0, "application/pdf");
        assert_eq!(sniff(b"OggS\0\x02").unwrap().0, "audio/ogg");
        assert_eq!(
            sniff("# Notes\n\n- ünï\tcode\r\n".as_bytes()).unwrap().0,
            "text/plain"
        );
        // A zip (a bomb, or an office file), an executable, a gzip, a NUL in text,
        // broken UTF-8 and an empty file are refused, whatever they are called.
        for bad in [
            &b"PK\x03\x04\x14\0\0\0\x08\0"[..],
            b"\x7fELF\x02\x01\x01",
            b"\x1f\x8b\x08\0",
            b"plain but\0binary",
            b"caf\xe9",
            b"",
            b"RIFF\0\0\0\0WAVEfmt ",
        ] {
            assert!(sniff(bad).is_none(), "{bad:?}");
        }
    }
}
