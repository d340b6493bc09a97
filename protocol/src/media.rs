//! Media by reference: the shape of a `media` attachment and its limits.
//!
//! Owns the `Media` type that both the JSON frames (`frames`) and the ring
//! records (`records`) carry, and the check of its shape. Never fetches or
//! reads the file: the server only passes the reference on.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use crate::limits::{MEDIA_BYTES_MAX, MEDIA_URL_BYTES_MAX};

/// `"media":{"url":"https://...","size":123,"sha256":"<64 hex>"}`: a file
/// the client uploaded elsewhere. The server checks its shape and limits
/// only; it never fetches it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Media<'a> {
    #[serde(borrow)]
    pub url: Cow<'a, str>,
    pub size: u64,
    #[serde(borrow)]
    pub sha256: Cow<'a, str>,
}

impl Media<'_> {
    /// The same reference with its strings owned.
    pub fn into_owned(self) -> Media<'static> {
        Media {
            url: Cow::Owned(self.url.into_owned()),
            size: self.size,
            sha256: Cow::Owned(self.sha256.into_owned()),
        }
    }

    /// Why this reference is refused, if it is.
    pub fn problem(&self) -> Option<String> {
        if !self.url.starts_with("https://") || self.url.len() > MEDIA_URL_BYTES_MAX {
            return Some(format!(
                "`media.url` must be an https:// URL of at most {MEDIA_URL_BYTES_MAX} bytes"
            ));
        }
        if self
            .url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Some("`media.url` must not contain spaces or control characters".into());
        }
        if self.size == 0 || self.size > MEDIA_BYTES_MAX {
            return Some(format!("`media.size` must be 1-{MEDIA_BYTES_MAX} bytes"));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some("`media.sha256` must be 64 hex digits".into());
        }
        None
    }
}
