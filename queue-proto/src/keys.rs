//! The key hierarchy. One 256-bit master key, held only by the control plane; every other
//! key is derived from it with HKDF-SHA256 (RFC 5869) under a constant label:
//!
//! ```text
//! control store:  HKDF(ikm = master, salt = CONTROL_SALT, info = "ironclaw/v1/control-store")
//! audit head:     HKDF(ikm = master, salt = CONTROL_SALT, info = "ironclaw/v1/audit-head")
//! session keys:   HKDF(ikm = master, salt = session salt, info = "ironclaw/v1/<purpose>/<session id>")
//!                 purpose ∈ inbox-db, inbox-envelope, outbox-db, outbox-envelope, agent-state
//! ```
//!
//! The session salt is 32 random bytes kept in the control store. Deleting a session
//! deletes its salt, after which none of its keys can be derived again, even by someone
//! holding the master key and a backup of the session's files (crypto-shredding).
//! `SECURITY.md` documents these labels as part of the on-disk format.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

#[cfg(any(feature = "agent", feature = "control-plane"))]
use crate::ids::SessionId;

/// Length of every key and salt, in bytes.
pub const KEY_BYTES: usize = 32;

/// The fixed HKDF salt for keys that have no per-session salt (the control store).
pub const CONTROL_SALT: &[u8] = b"ironclaw/v1/control-salt";

/// Label of the control store's SQLCipher key.
pub const LABEL_CONTROL_STORE: &str = "ironclaw/v1/control-store";
/// The key that seals the audit trail's head (its last sequence number and hash).
pub const LABEL_AUDIT_HEAD: &str = "ironclaw/v1/audit-head";
/// Label prefix of a session's inbox SQLCipher key; the session id follows.
pub const LABEL_INBOX_DB: &str = "ironclaw/v1/inbox-db/";
/// Label prefix of a session's inbox row-envelope key.
pub const LABEL_INBOX_ENVELOPE: &str = "ironclaw/v1/inbox-envelope/";
/// Label prefix of a session's outbox SQLCipher key.
pub const LABEL_OUTBOX_DB: &str = "ironclaw/v1/outbox-db/";
/// Label prefix of a session's outbox row-envelope key.
pub const LABEL_OUTBOX_ENVELOPE: &str = "ironclaw/v1/outbox-envelope/";
/// Label prefix of the key of the agent's own state database.
pub const LABEL_AGENT_STATE: &str = "ironclaw/v1/agent-state/";

/// Errors from key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key material has {got} bytes, expected {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("the operating system's random source failed")]
    Random(#[source] getrandom::Error),
    #[error("key handover is malformed: {0}")]
    Handover(&'static str),
}

/// 256 bits of secret key material. The bytes leave only through [`expose_secret`], are
/// wiped on drop, and never appear in `Debug` output.
///
/// [`expose_secret`]: SecretKey::expose_secret
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey([u8; KEY_BYTES]);

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// Copies key bytes out of a slice of exactly [`KEY_BYTES`].
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let arr: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| KeyError::WrongLength {
            got: bytes.len(),
            expected: KEY_BYTES,
        })?;
        Ok(Self(arr))
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut bytes).map_err(KeyError::Random)?;
        Ok(Self(bytes))
    }

    /// The raw bytes, for the one place that hands them to a cipher.
    pub fn expose_secret(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// Compares two keys in constant time.
    pub fn ct_eq(&self, other: &SecretKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

/// A session's random salt, stored in the control store. Destroying it destroys the
/// session's keys.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionSalt([u8; KEY_BYTES]);

impl SessionSalt {
    /// Wraps stored salt bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// A fresh salt for a new session.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::getrandom(&mut bytes).map_err(KeyError::Random)?;
        Ok(Self(bytes))
    }

    /// The raw bytes, for storing them.
    pub fn expose_secret(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for SessionSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSalt([redacted])")
    }
}

/// The two keys of one direction of a session's queue: the SQLCipher key of its segment
/// files and the XChaCha20-Poly1305 key of the rows inside them.
#[derive(Clone, Debug)]
pub struct QueueKeys {
    pub db: SecretKey,
    pub envelope: SecretKey,
}

/// Everything one session's agent is given, and nothing more: its own queue keys and the
/// key of its own state database. Never the master key.
#[derive(Clone, Debug)]
pub struct SessionKeys {
    pub inbox: QueueKeys,
    pub outbox: QueueKeys,
    pub agent_state: SecretKey,
}

/// First bytes of the key handover the control plane writes to the agent's stdin.
pub const HANDOVER_MAGIC: &[u8; 8] = b"ICKEYS01";

/// Length of the key handover: magic, one length byte, the session id, five keys.
#[cfg(any(feature = "agent", feature = "control-plane"))]
fn handover_len(session_len: usize) -> usize {
    HANDOVER_MAGIC.len() + 1 + session_len + 5 * KEY_BYTES
}

impl SessionKeys {
    /// Encodes the keys for the handover through the agent's stdin pipe:
    /// `"ICKEYS01" ‖ u8 len ‖ session id ‖ inbox-db ‖ inbox-envelope ‖ outbox-db ‖
    /// outbox-envelope ‖ agent-state`.
    #[cfg(feature = "control-plane")]
    pub fn to_handover(&self, session: &SessionId) -> zeroize::Zeroizing<Vec<u8>> {
        let id = session.as_str().as_bytes();
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(handover_len(id.len())));
        out.extend_from_slice(HANDOVER_MAGIC);
        out.push(u8::try_from(id.len()).expect("session ids are at most 32 bytes"));
        out.extend_from_slice(id);
        for key in self.all() {
            out.extend_from_slice(key.expose_secret());
        }
        out
    }

    /// Decodes a handover, returning the session it is for and its keys.
    #[cfg(feature = "agent")]
    pub fn from_handover(bytes: &[u8]) -> Result<(SessionId, SessionKeys), KeyError> {
        let rest = bytes
            .strip_prefix(HANDOVER_MAGIC.as_slice())
            .ok_or(KeyError::Handover("wrong magic"))?;
        let (&id_len, rest) = rest.split_first().ok_or(KeyError::Handover("truncated"))?;
        let id_len = usize::from(id_len);
        if bytes.len() != handover_len(id_len) {
            return Err(KeyError::Handover("wrong length"));
        }
        let (id, keys) = rest.split_at(id_len);
        let id =
            std::str::from_utf8(id).map_err(|_| KeyError::Handover("session id is not text"))?;
        let session =
            SessionId::try_from(id).map_err(|_| KeyError::Handover("session id is invalid"))?;
        let key = |i: usize| SecretKey::from_slice(&keys[i * KEY_BYTES..(i + 1) * KEY_BYTES]);
        let keys = SessionKeys {
            inbox: QueueKeys {
                db: key(0)?,
                envelope: key(1)?,
            },
            outbox: QueueKeys {
                db: key(2)?,
                envelope: key(3)?,
            },
            agent_state: key(4)?,
        };
        Ok((session, keys))
    }

    #[cfg(feature = "control-plane")]
    fn all(&self) -> [&SecretKey; 5] {
        [
            &self.inbox.db,
            &self.inbox.envelope,
            &self.outbox.db,
            &self.outbox.envelope,
            &self.agent_state,
        ]
    }
}

#[cfg(feature = "control-plane")]
pub use master::*;

#[cfg(feature = "control-plane")]
mod master {
    use super::*;

    /// HKDF-SHA256 extract-then-expand (RFC 5869) into `okm`.
    pub(crate) fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], okm: &mut [u8]) {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm);
        hk.expand(info, okm)
            .expect("every caller asks for at most 255 * 32 bytes, the HKDF-SHA256 limit");
    }

    fn derive(salt: &[u8], ikm: &SecretKey, info: &[u8]) -> SecretKey {
        let mut okm = [0u8; KEY_BYTES];
        hkdf_sha256(salt, ikm.expose_secret(), info, &mut okm);
        let key = SecretKey(okm);
        okm.zeroize();
        key
    }

    /// The root of every key. Exists only in the control plane.
    #[derive(Clone, Debug)]
    pub struct MasterKey(SecretKey);

    impl MasterKey {
        /// Wraps the master key's bytes, as read from its key file or credential.
        pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
            Self(SecretKey(bytes))
        }

        /// A fresh master key for `ironclaw init`.
        pub fn generate() -> Result<Self, KeyError> {
            SecretKey::generate().map(Self)
        }

        /// The raw bytes, for writing the key file.
        pub fn expose_secret(&self) -> &[u8; KEY_BYTES] {
            self.0.expose_secret()
        }
    }

    fn session_info(prefix: &str, session: &SessionId) -> Vec<u8> {
        [prefix.as_bytes(), session.as_str().as_bytes()].concat()
    }

    /// `HKDF-SHA256(master, CONTROL_SALT, "ironclaw/v1/control-store")`: the SQLCipher key
    /// of the control plane's own store.
    pub fn derive_control_store_key(master: &MasterKey) -> SecretKey {
        derive(CONTROL_SALT, &master.0, LABEL_CONTROL_STORE.as_bytes())
    }

    /// `HKDF-SHA256(master, CONTROL_SALT, "ironclaw/v1/audit-head")`: the HMAC-SHA256
    /// key over the audit trail's head. Whoever holds only the control-store key can
    /// rewrite rows but cannot seal a shorter trail.
    pub fn derive_audit_head_key(master: &MasterKey) -> SecretKey {
        derive(CONTROL_SALT, &master.0, LABEL_AUDIT_HEAD.as_bytes())
    }

    /// `HKDF-SHA256(master, salt, "ironclaw/v1/inbox-db/<session>")`.
    pub fn derive_inbox_db_key(m: &MasterKey, s: &SessionId, salt: &SessionSalt) -> SecretKey {
        derive(&salt.0, &m.0, &session_info(LABEL_INBOX_DB, s))
    }

    /// `HKDF-SHA256(master, salt, "ironclaw/v1/inbox-envelope/<session>")`.
    pub fn derive_inbox_envelope_key(
        m: &MasterKey,
        s: &SessionId,
        salt: &SessionSalt,
    ) -> SecretKey {
        derive(&salt.0, &m.0, &session_info(LABEL_INBOX_ENVELOPE, s))
    }

    /// `HKDF-SHA256(master, salt, "ironclaw/v1/outbox-db/<session>")`.
    pub fn derive_outbox_db_key(m: &MasterKey, s: &SessionId, salt: &SessionSalt) -> SecretKey {
        derive(&salt.0, &m.0, &session_info(LABEL_OUTBOX_DB, s))
    }

    /// `HKDF-SHA256(master, salt, "ironclaw/v1/outbox-envelope/<session>")`.
    pub fn derive_outbox_envelope_key(
        m: &MasterKey,
        s: &SessionId,
        salt: &SessionSalt,
    ) -> SecretKey {
        derive(&salt.0, &m.0, &session_info(LABEL_OUTBOX_ENVELOPE, s))
    }

    /// `HKDF-SHA256(master, salt, "ironclaw/v1/agent-state/<session>")`.
    pub fn derive_agent_state_key(m: &MasterKey, s: &SessionId, salt: &SessionSalt) -> SecretKey {
        derive(&salt.0, &m.0, &session_info(LABEL_AGENT_STATE, s))
    }

    /// All keys of one session.
    pub fn derive_session_keys(m: &MasterKey, s: &SessionId, salt: &SessionSalt) -> SessionKeys {
        SessionKeys {
            inbox: QueueKeys {
                db: derive_inbox_db_key(m, s, salt),
                envelope: derive_inbox_envelope_key(m, s, salt),
            },
            outbox: QueueKeys {
                db: derive_outbox_db_key(m, s, salt),
                envelope: derive_outbox_envelope_key(m, s, salt),
            },
            agent_state: derive_agent_state_key(m, s, salt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 5869, appendix A, test cases 1–3 (the SHA-256 ones).
    #[cfg(feature = "control-plane")]
    #[test]
    fn rfc5869_vectors() {
        let cases = [
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "000102030405060708090a0b0c",
                "f0f1f2f3f4f5f6f7f8f9",
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\
                 404142434445464748494a4b4c4d4e4f",
                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f\
                 808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\
                 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
                "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf\
                 d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef\
                 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
                 59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
                 cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "",
                "",
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
            ),
        ];
        for (ikm, salt, info, okm) in cases {
            let expected = unhex(&okm.replace(' ', ""));
            let mut out = vec![0u8; expected.len()];
            hkdf_sha256(
                &unhex(&salt.replace(' ', "")),
                &unhex(&ikm.replace(' ', "")),
                &unhex(&info.replace(' ', "")),
                &mut out,
            );
            assert_eq!(hex::encode(&out), hex::encode(&expected));
        }
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = SecretKey::from_bytes([0xab; KEY_BYTES]);
        let shown = format!("{key:?} {:?}", SessionSalt::from_bytes([0xab; KEY_BYTES]));
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn constant_time_eq_compares_contents() {
        let a = SecretKey::from_bytes([1; KEY_BYTES]);
        assert!(a.ct_eq(&SecretKey::from_bytes([1; KEY_BYTES])));
        let mut other = [1; KEY_BYTES];
        other[31] = 2;
        assert!(!a.ct_eq(&SecretKey::from_bytes(other)));
    }

    #[cfg(feature = "control-plane")]
    mod derivation {
        use super::*;

        fn master() -> MasterKey {
            let mut bytes = [0u8; KEY_BYTES];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = i as u8;
            }
            MasterKey::from_bytes(bytes)
        }

        fn hex_of(k: &SecretKey) -> String {
            hex::encode(k.expose_secret())
        }

        /// Known answers that pin our labels. Checked once against an independent HKDF
        /// (Python's hmac module); the interoperability test re-derives keys from SECURITY.md.
        #[test]
        fn known_answers_pin_the_labels() {
            let m = master();
            let s = SessionId::try_from("tg-42").unwrap();
            let salt = SessionSalt::from_bytes([0x5a; KEY_BYTES]);
            let got = [
                hex_of(&derive_control_store_key(&m)),
                hex_of(&derive_audit_head_key(&m)),
                hex_of(&derive_inbox_db_key(&m, &s, &salt)),
                hex_of(&derive_inbox_envelope_key(&m, &s, &salt)),
                hex_of(&derive_outbox_db_key(&m, &s, &salt)),
                hex_of(&derive_outbox_envelope_key(&m, &s, &salt)),
                hex_of(&derive_agent_state_key(&m, &s, &salt)),
            ];
            assert_eq!(got, KNOWN_ANSWERS);
        }

        const KNOWN_ANSWERS: [&str; 7] = [
            "2ae94c2a967fa5f00dde9c028cd282f3e7a04e24ea724d2da46a6b042eb49af8",
            "7377d8c2448366f14e21bdf7ce0d907afc442ea31bc46968607ab87bee89363d",
            "27f239abf9c63c250472095c3607816d7866d6a821ac53ccade13574038847d8",
            "52403edfb0687cac97b02cf2a71566d6ab8d8201c4c08f7d16dc38b93fdc0aa7",
            "162fa35da616efc54286c54e82837f479a14d893575a2fddc4fd9882d2a32f0a",
            "fbdefbc0cc730ceeaf11496a5ef06fa14b46b01f323b2726032715c5afbec27e",
            "16d00c2c99b72f5b6596b0c7ed7988bedbfcd82a5f654e13e502f486566b62fa",
        ];

        #[test]
        fn every_purpose_session_and_salt_gives_a_different_key() {
            let m = master();
            let a = SessionId::try_from("a").unwrap();
            let b = SessionId::try_from("b").unwrap();
            let salt1 = SessionSalt::from_bytes([1; KEY_BYTES]);
            let salt2 = SessionSalt::from_bytes([2; KEY_BYTES]);
            let mut all = vec![
                hex_of(&derive_control_store_key(&m)),
                hex_of(&derive_audit_head_key(&m)),
            ];
            for (s, salt) in [(&a, &salt1), (&b, &salt1), (&a, &salt2)] {
                let k = derive_session_keys(&m, s, salt);
                all.extend(
                    [
                        &k.inbox.db,
                        &k.inbox.envelope,
                        &k.outbox.db,
                        &k.outbox.envelope,
                        &k.agent_state,
                    ]
                    .map(hex_of),
                );
            }
            let unique: std::collections::BTreeSet<_> = all.iter().collect();
            assert_eq!(unique.len(), all.len());
        }

        #[cfg(feature = "agent")]
        #[test]
        fn handover_round_trips_and_rejects_damage() {
            let s = SessionId::try_from("console").unwrap();
            let keys = derive_session_keys(&master(), &s, &SessionSalt::from_bytes([9; KEY_BYTES]));
            let bytes = keys.to_handover(&s);
            let (s2, k2) = SessionKeys::from_handover(&bytes).unwrap();
            assert_eq!(s2, s);
            assert!(k2.outbox.envelope.ct_eq(&keys.outbox.envelope));
            assert!(k2.agent_state.ct_eq(&keys.agent_state));
            assert!(SessionKeys::from_handover(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.to_vec();
            longer.push(0);
            assert!(SessionKeys::from_handover(&longer).is_err());
            let mut bad_magic = bytes.to_vec();
            bad_magic[0] ^= 1;
            assert!(SessionKeys::from_handover(&bad_magic).is_err());
            let mut bad_id = bytes.to_vec();
            bad_id[9] = b'.';
            assert!(SessionKeys::from_handover(&bad_id).is_err());
        }
    }
}
