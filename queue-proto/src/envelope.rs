//! The row envelope: `seal[key, aad](plaintext) = nonce ‖ XChaCha20-Poly1305(key, nonce,
//! aad, plaintext)` with a fresh random 192-bit nonce per row.
//!
//! The associated data binds a row to its session, direction, segment seq, position and
//! kind, so a row copied into another session, the other direction, another segment,
//! another position or relabelled as another kind fails to open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::ids::{Direction, Seq, SessionId};
use crate::keys::SecretKey;

/// Nonce length of XChaCha20-Poly1305.
pub const NONCE_BYTES: usize = 24;
/// Authentication tag length of Poly1305.
pub const TAG_BYTES: usize = 16;
/// Domain separator at the start of every associated-data string.
pub const AAD_DOMAIN: &[u8] = b"ironclaw/v1/envelope";

/// Errors from sealing and opening rows. Opening failures are deliberately one variant:
/// which check failed is not something to tell a forger.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("sealed row has {got} bytes, outside {min}..={max}")]
    BadLength { got: usize, min: usize, max: usize },
    #[error("sealed row failed authentication (wrong key, or moved, relabelled or modified)")]
    Forged,
    #[error("the operating system's random source failed")]
    Random(#[source] getrandom::Error),
}

/// Where a row belongs. Everything here is bound into the AEAD tag.
#[derive(Debug, Clone, Copy)]
pub struct RowPlace<'a> {
    pub session: &'a SessionId,
    pub direction: Direction,
    pub seq: Seq,
    pub index: u32,
    pub kind: &'a str,
}

impl RowPlace<'_> {
    /// `AAD_DOMAIN ‖ 0x00 ‖ u8 len ‖ session ‖ u8 len ‖ direction ‖ u64be seq ‖
    /// u32be index ‖ u8 len ‖ kind`. Length prefixes keep the encoding unambiguous.
    pub fn associated_data(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 80);
        aad.extend_from_slice(AAD_DOMAIN);
        aad.push(0);
        for field in [self.session.as_str(), self.direction.as_str()] {
            push_short(&mut aad, field.as_bytes());
        }
        aad.extend_from_slice(&self.seq.0.to_be_bytes());
        aad.extend_from_slice(&self.index.to_be_bytes());
        push_short(&mut aad, self.kind.as_bytes());
        aad
    }
}

fn push_short(out: &mut Vec<u8>, field: &[u8]) {
    // Session ids, directions and kinds are all short validated strings.
    out.push(u8::try_from(field.len()).expect("aad fields are shorter than 256 bytes"));
    out.extend_from_slice(field);
}

/// Seals `plaintext` for `place` under `key` with a fresh random nonce.
pub fn seal(
    key: &SecretKey,
    place: &RowPlace<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::getrandom(&mut nonce).map_err(EnvelopeError::Random)?;
    Ok(seal_with_nonce(key, place, &nonce, plaintext))
}

/// The deterministic core of [`seal`]; only known-answer tests choose the nonce.
fn seal_with_nonce(
    key: &SecretKey,
    place: &RowPlace<'_>,
    nonce: &[u8; NONCE_BYTES],
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.expose_secret().into());
    let aad = place.associated_data();
    let ct = cipher
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption fails only past 256 GiB per message");
    let mut out = Vec::with_capacity(NONCE_BYTES + ct.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&ct);
    out
}

/// Opens a row sealed for `place`. The length is checked against `max_plaintext` before
/// any decryption work is done.
pub fn open(
    key: &SecretKey,
    place: &RowPlace<'_>,
    sealed: &[u8],
    max_plaintext: usize,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let (min, max) = (
        NONCE_BYTES + TAG_BYTES,
        NONCE_BYTES + TAG_BYTES + max_plaintext,
    );
    if !(min..=max).contains(&sealed.len()) {
        return Err(EnvelopeError::BadLength {
            got: sealed.len(),
            min,
            max,
        });
    }
    let (nonce, ct) = sealed.split_at(NONCE_BYTES);
    let cipher = XChaCha20Poly1305::new(key.expose_secret().into());
    let aad = place.associated_data();
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::Forged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KEY_BYTES;
    use proptest::prelude::*;

    fn session(s: &str) -> SessionId {
        SessionId::try_from(s).unwrap()
    }

    fn place<'a>(s: &'a SessionId, kind: &'a str) -> RowPlace<'a> {
        RowPlace {
            session: s,
            direction: Direction::Inbox,
            seq: Seq(7),
            index: 3,
            kind,
        }
    }

    #[test]
    fn associated_data_layout_is_pinned() {
        let s = session("tg-42");
        let aad = place(&s, "user_message").associated_data();
        assert_eq!(
            hex::encode(aad),
            concat!(
                "69726f6e636c61772f76312f656e76656c6f7065", // "ironclaw/v1/envelope"
                "00",
                "05",
                "74672d3432", // "tg-42"
                "05",
                "696e626f78",       // "inbox"
                "0000000000000007", // seq
                "00000003",         // index
                "0c",
                "757365725f6d657373616765" // "user_message"
            )
        );
    }

    /// A pinned envelope: key 0x42.., nonce 0x24.., the place above. Checked once against libsodium's
    /// XChaCha20-Poly1305; the interoperability test opens real rows with it.
    #[test]
    fn known_answer_envelope() {
        let key = SecretKey::from_bytes([0x42; KEY_BYTES]);
        let s = session("tg-42");
        let sealed = seal_with_nonce(
            &key,
            &place(&s, "user_message"),
            &[0x24; NONCE_BYTES],
            b"hello",
        );
        assert_eq!(hex::encode(&sealed), KNOWN_ENVELOPE);
        assert_eq!(
            &*open(&key, &place(&s, "user_message"), &sealed, 64).unwrap(),
            b"hello"
        );
    }

    const KNOWN_ENVELOPE: &str = "242424242424242424242424242424242424242424242424cd3bbb0901e506e2416ec79c5b55e562da66c1cbfb";

    #[test]
    fn every_bound_field_is_checked() {
        let key = SecretKey::from_bytes([1; KEY_BYTES]);
        let s = session("a");
        let other_s = session("b");
        let p = place(&s, "user_message");
        let sealed = seal(&key, &p, b"secret").unwrap();
        let wrong_places = [
            RowPlace {
                session: &other_s,
                ..p
            },
            RowPlace {
                direction: Direction::Outbox,
                ..p
            },
            RowPlace { seq: Seq(8), ..p },
            RowPlace { index: 4, ..p },
            RowPlace {
                kind: "assistant_reply",
                ..p
            },
        ];
        for wrong in wrong_places {
            assert!(
                matches!(open(&key, &wrong, &sealed, 64), Err(EnvelopeError::Forged)),
                "{wrong:?}"
            );
        }
        let other_key = SecretKey::from_bytes([2; KEY_BYTES]);
        assert!(matches!(
            open(&other_key, &p, &sealed, 64),
            Err(EnvelopeError::Forged)
        ));
        for i in 0..sealed.len() {
            let mut flipped = sealed.clone();
            flipped[i] ^= 0x01;
            assert!(
                matches!(open(&key, &p, &flipped, 64), Err(EnvelopeError::Forged)),
                "byte {i}"
            );
        }
        assert!(matches!(
            open(&key, &p, &sealed[..sealed.len() - 1], 64),
            Err(EnvelopeError::Forged)
        ));
    }

    #[test]
    fn length_is_checked_before_decrypting() {
        let key = SecretKey::from_bytes([1; KEY_BYTES]);
        let s = session("a");
        let p = place(&s, "note");
        let sealed = seal(&key, &p, &[0u8; 100]).unwrap();
        assert!(matches!(
            open(&key, &p, &sealed, 99),
            Err(EnvelopeError::BadLength { .. })
        ));
        assert!(matches!(
            open(&key, &p, &[0u8; 39], 99),
            Err(EnvelopeError::BadLength { .. })
        ));
    }

    #[test]
    fn nonces_are_fresh() {
        let key = SecretKey::from_bytes([1; KEY_BYTES]);
        let s = session("a");
        let p = place(&s, "note");
        assert_ne!(
            seal(&key, &p, b"x").unwrap()[..NONCE_BYTES],
            seal(&key, &p, b"x").unwrap()[..NONCE_BYTES]
        );
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(
            key in any::<[u8; KEY_BYTES]>(),
            plaintext in proptest::collection::vec(any::<u8>(), 0..2048),
            seq in any::<u64>(),
            index in any::<u32>(),
            outbox in any::<bool>(),
        ) {
            let key = SecretKey::from_bytes(key);
            let s = session("prop");
            let direction = if outbox { Direction::Outbox } else { Direction::Inbox };
            let p = RowPlace { session: &s, direction, seq: Seq(seq), index, kind: "note" };
            let sealed = seal(&key, &p, &plaintext).unwrap();
            prop_assert_eq!(sealed.len(), plaintext.len() + NONCE_BYTES + TAG_BYTES);
            prop_assert_eq!(&*open(&key, &p, &sealed, 2048).unwrap(), &plaintext);
        }
    }
}
