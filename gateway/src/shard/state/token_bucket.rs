//! Token buckets for rate limits: per connection (all text frames) and per user
//! (sends, shared by all of a user's devices, which all live on this shard).
//!
//! Owns the refill arithmetic, with the clock passed in (shard milliseconds),
//! in 8 bytes per bucket (part of the per-connection memory budget). Never
//! decides what happens over the limit: `send::reply` answers `rate_limited`.

/// A bucket of `f32` tokens refilled continuously; `last_ms` wraps every ~49
/// days, which is harmless because a bucket idle that long is full anyway
/// (heartbeats close connections after 90 s of silence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f32,
    last_ms: u32,
}

/// Rate and burst of one kind of bucket (from config).
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub per_s: f32,
    pub burst: f32,
}

impl TokenBucket {
    pub fn full(limit: Limit, now_ms: u64) -> Self {
        Self {
            tokens: limit.burst,
            last_ms: now_ms as u32,
        }
    }

    /// Takes one token, or says how many milliseconds until one is available.
    pub fn try_take(&mut self, limit: Limit, now_ms: u64) -> Result<(), u64> {
        let now = now_ms as u32;
        let elapsed_ms = now.wrapping_sub(self.last_ms);
        self.last_ms = now;
        self.tokens = (self.tokens + elapsed_ms as f32 * limit.per_s / 1000.0).min(limit.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        Err(((missing * 1000.0 / limit.per_s).ceil() as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        per_s: 10.0,
        burst: 3.0,
    };

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let mut bucket = TokenBucket::full(LIMIT, 0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(LIMIT, 0), Ok(()));
        }
        // Empty: one token takes 100 ms at 10/s.
        assert_eq!(bucket.try_take(LIMIT, 0), Err(100));
        assert_eq!(bucket.try_take(LIMIT, 60), Err(40));
        assert_eq!(bucket.try_take(LIMIT, 100), Ok(()));
        // Never more than the burst, however long it rests.
        assert_eq!(bucket.try_take(LIMIT, 1_000_000), Ok(()));
        assert_eq!(bucket.try_take(LIMIT, 1_000_000), Ok(()));
        assert_eq!(bucket.try_take(LIMIT, 1_000_000), Ok(()));
        assert!(bucket.try_take(LIMIT, 1_000_000).is_err());
    }

    #[test]
    fn the_clock_wrapping_past_u32_is_harmless() {
        let start = u64::from(u32::MAX) - 5;
        let mut bucket = TokenBucket::full(LIMIT, start);
        for _ in 0..3 {
            bucket.try_take(LIMIT, start).unwrap();
        }
        assert_eq!(
            bucket.try_take(LIMIT, start + 100),
            Ok(()),
            "100 ms across the wrap refills one token"
        );
    }

    #[test]
    fn a_bucket_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<TokenBucket>(), 8);
    }
}
