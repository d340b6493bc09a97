//! The wire format between nodes: a compact binary envelope with a version byte.
//!
//! Owns encoding and decoding of what one node publishes for another: a
//! durable message for one user's devices, carried as the JSON `message`
//! frame those devices receive (so a node never re-encodes it). Never JSON
//! on the outside, never trusted: every field is length-checked on decode.

use bytes::Bytes;
use chat_protocol::binary::{DecodeError, Decoder, Encoder};

/// Version of the envelope layout; a node refuses others (and says so).
pub const ENVELOPE_VERSION: u8 = 1;
const KIND_DELIVER: u8 = 1;

/// A message for the devices of `user` on whichever nodes have them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// The node that published it (for logs; a node does not hear itself).
    pub origin_node: u16,
    pub user: Box<str>,
    pub message_id: u64,
    /// The `message` frame's JSON, exactly as local devices got it.
    pub json: Bytes,
}

impl Deliver {
    pub fn encode(&self) -> Vec<u8> {
        let mut encoder = Encoder::with_capacity(24 + self.user.len() + self.json.len());
        encoder
            .u8(ENVELOPE_VERSION)
            .u8(KIND_DELIVER)
            .u16(self.origin_node)
            .u64(self.message_id)
            .str(&self.user)
            .bytes(&self.json);
        encoder.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut decoder = Decoder::new(bytes);
        if decoder.u8()? != ENVELOPE_VERSION {
            return Err(DecodeError("unknown envelope version"));
        }
        if decoder.u8()? != KIND_DELIVER {
            return Err(DecodeError("unknown envelope kind"));
        }
        let deliver = Deliver {
            origin_node: decoder.u16()?,
            message_id: decoder.u64()?,
            user: decoder.str()?.into(),
            json: Bytes::copy_from_slice(decoder.bytes()?),
        };
        decoder.finish()?;
        Ok(deliver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips_and_bad_ones_are_refused() {
        let deliver = Deliver {
            origin_node: 17,
            user: "bob".into(),
            message_id: 42,
            json: Bytes::from_static(br#"{"type":"message"}"#),
        };
        let bytes = deliver.encode();
        assert_eq!(Deliver::decode(&bytes), Ok(deliver));
        let mut other_version = bytes.clone();
        other_version[0] = 2;
        assert!(Deliver::decode(&other_version).is_err());
        assert!(Deliver::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(Deliver::decode(&trailing).is_err());
    }
}
