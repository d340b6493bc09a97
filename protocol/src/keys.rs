//! The end-to-end key directory's frames: uploading a device's public keys
//! and fetching a user's bundles (X3DH-style).
//!
//! Owns the shapes and limits of what clients upload. Every key is an opaque
//! base64 string the server stores and hands out; it never interprets one.
//! Never decides who may fetch (the gateway does) and never touches storage.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use crate::limits::{KEY_CHARS_MAX, STORED_PREKEYS_MAX, UPLOAD_PREKEYS_MAX};

/// `{"type":"keys_upload", ...}`: a device's identity key, signed prekey and
/// a batch of one-time prekeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysUpload<'a> {
    pub identity_key: Cow<'a, str>,
    pub signed_prekey: Cow<'a, str>,
    pub signed_prekey_signature: Cow<'a, str>,
    pub one_time_prekeys: Vec<Cow<'a, str>>,
}

impl KeysUpload<'_> {
    /// The same upload with every key owned (it waits for storage).
    pub fn into_owned(self) -> KeysUpload<'static> {
        KeysUpload {
            identity_key: Cow::Owned(self.identity_key.into_owned()),
            signed_prekey: Cow::Owned(self.signed_prekey.into_owned()),
            signed_prekey_signature: Cow::Owned(self.signed_prekey_signature.into_owned()),
            one_time_prekeys: self
                .one_time_prekeys
                .into_iter()
                .map(|key| Cow::Owned(key.into_owned()))
                .collect(),
        }
    }
}

/// Whether `key` is a plausible base64 key (the server never decodes it).
pub fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= KEY_CHARS_MAX
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

impl KeysUpload<'_> {
    /// Why this upload is refused, if it is.
    pub fn problem(&self) -> Option<String> {
        for (name, key) in [
            ("identity_key", &self.identity_key),
            ("signed_prekey", &self.signed_prekey),
            ("signed_prekey_signature", &self.signed_prekey_signature),
        ] {
            if !is_key(key) {
                return Some(format!(
                    "`{name}` must be base64 of at most {KEY_CHARS_MAX} characters"
                ));
            }
        }
        if self.one_time_prekeys.len() > UPLOAD_PREKEYS_MAX {
            return Some(format!(
                "at most {UPLOAD_PREKEYS_MAX} `one_time_prekeys` per upload"
            ));
        }
        if !self.one_time_prekeys.iter().all(|key| is_key(key)) {
            return Some(format!(
                "each of `one_time_prekeys` must be base64 of at most {KEY_CHARS_MAX} characters"
            ));
        }
        None
    }
}

/// One device's bundle, as fetched. Serialised as JSON for clients and,
/// with postcard, on the read path (so no field may be skipped when empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub device: String,
    pub identity_key: String,
    pub signed_prekey: String,
    pub signed_prekey_signature: String,
    /// Consumed by this fetch; `null` when the device has none left.
    pub one_time_prekey: Option<String>,
}

#[derive(Serialize)]
struct KeysFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    user: &'a str,
    devices: &'a [Bundle],
}

/// `keys`: every device of `user` that uploaded keys, one bundle each.
pub fn encode_keys(user: &str, devices: &[Bundle]) -> Vec<u8> {
    serde_json::to_vec(&KeysFrame {
        kind: "keys",
        user,
        devices,
    })
    .expect("keys frames serialize")
}

/// `devices`: the devices of `user` that uploaded keys, sorted.
pub fn encode_devices(user: &str, devices: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": "devices",
        "user": user,
        "devices": devices,
    }))
    .expect("devices frames serialize")
}

/// `keys_uploaded`: how many one-time prekeys the device now has stored.
pub fn encode_uploaded(stored: u32) -> Vec<u8> {
    format!(r#"{{"type":"keys_uploaded","one_time_prekeys":{stored}}}"#).into_bytes()
}

/// `keys_low`: a device of this user is running out of one-time prekeys.
pub fn encode_low(device: &str, remaining: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": "keys_low",
        "device": device,
        "remaining": remaining,
    }))
    .expect("keys_low serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(otps: usize) -> KeysUpload<'static> {
        KeysUpload {
            identity_key: "aWs=".into(),
            signed_prekey: "c3Br".into(),
            signed_prekey_signature: "c2ln".into(),
            one_time_prekeys: (0..otps).map(|i| Cow::Owned(format!("b3Rw{i}"))).collect(),
        }
    }

    #[test]
    fn uploads_are_checked_for_shape_and_bounds() {
        assert_eq!(upload(3).problem(), None);
        assert!(upload(UPLOAD_PREKEYS_MAX + 1)
            .problem()
            .unwrap()
            .contains("at most"));
        let mut bad = upload(1);
        bad.identity_key = "not base64!".into();
        assert!(bad.problem().unwrap().contains("identity_key"));
        let mut long = upload(1);
        long.one_time_prekeys[0] = "A".repeat(KEY_CHARS_MAX + 1).into();
        assert!(long.problem().is_some());
    }

    #[test]
    fn frames_encode_as_documented() {
        let bundle = Bundle {
            device: "phone".into(),
            identity_key: "aWs=".into(),
            signed_prekey: "c3Br".into(),
            signed_prekey_signature: "c2ln".into(),
            one_time_prekey: None,
        };
        let keys: serde_json::Value =
            serde_json::from_slice(&encode_keys("bob", &[bundle])).unwrap();
        assert_eq!(
            keys["devices"][0]["one_time_prekey"],
            serde_json::Value::Null
        );
        let uploaded: serde_json::Value = serde_json::from_slice(&encode_uploaded(7)).unwrap();
        assert_eq!(uploaded["one_time_prekeys"], 7);
        let low: serde_json::Value = serde_json::from_slice(&encode_low("phone", 2)).unwrap();
        assert_eq!(
            (low["device"].as_str(), low["remaining"].as_u64()),
            (Some("phone"), Some(2))
        );
    }
}
