//! Little-endian, length-prefixed binary fields: the codec under `records` and `store_wire`.
//!
//! Owns the field primitives (integers, u16-prefixed strings, u32-prefixed
//! bytes) and the one decoding error. Never allocates on decode: strings and
//! bytes borrow from the input. Every length is checked against what remains.

/// Input ended early or held something this version cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable record: {0}")]
pub struct DecodeError(pub &'static str);

/// Appends fields to a buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    pub bytes: Vec<u8>,
}

impl Encoder {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
        }
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.bytes.push(value);
        self
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A string of at most 65,535 bytes (ids; callers validate lengths first).
    pub fn str(&mut self, value: &str) -> &mut Self {
        let len = u16::try_from(value.len()).expect("short strings are validated ids");
        self.u16(len);
        self.bytes.extend_from_slice(value.as_bytes());
        self
    }

    /// A byte string of at most 4 GiB (bodies, nested records).
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        let len = u32::try_from(value.len()).expect("bodies are bounded far below 4 GiB");
        self.u32(len);
        self.bytes.extend_from_slice(value);
        self
    }

    /// A long string (a body).
    pub fn long_str(&mut self, value: &str) -> &mut Self {
        self.bytes(value.as_bytes())
    }
}

/// Reads fields from a buffer, front to back.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    input: &'a [u8],
}

impl<'a> Decoder<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { input }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        if self.input.len() < count {
            return Err(DecodeError("input ends inside a field"));
        }
        let (head, tail) = self.input.split_at(count);
        self.input = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    pub fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError("string is not UTF-8"))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    pub fn long_str(&mut self) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| DecodeError("string is not UTF-8"))
    }

    /// Fails unless every byte was read (catches a wrong kind or version).
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(DecodeError("trailing bytes after the last field"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_truncation_is_an_error() {
        let mut encoder = Encoder::default();
        encoder
            .u8(7)
            .u16(513)
            .u32(70_000)
            .u64(u64::MAX)
            .str("héllo")
            .bytes(b"\0\x01");
        let bytes = encoder.bytes;
        let mut decoder = Decoder::new(&bytes);
        assert_eq!(decoder.u8(), Ok(7));
        assert_eq!(decoder.u16(), Ok(513));
        assert_eq!(decoder.u32(), Ok(70_000));
        assert_eq!(decoder.u64(), Ok(u64::MAX));
        assert_eq!(decoder.str(), Ok("héllo"));
        assert_eq!(decoder.bytes(), Ok(&b"\0\x01"[..]));
        assert_eq!(decoder.finish(), Ok(()));
        for cut in 0..bytes.len() {
            let mut decoder = Decoder::new(&bytes[..cut]);
            let all = (|| {
                decoder.u8()?;
                decoder.u16()?;
                decoder.u32()?;
                decoder.u64()?;
                decoder.str()?;
                decoder.bytes()?;
                Ok::<_, DecodeError>(())
            })();
            assert!(all.is_err(), "a cut at {cut} must not decode");
        }
    }
}
