//! Open-loop send schedule: the k-th send is due at `start + k / rate`,
//! whatever happened to earlier sends.
//!
//! Owns the arithmetic that makes the benchmark coordinated-omission-safe:
//! latency is measured from a send's *intended* time, and a send that goes out
//! late is counted as late, never skipped or rescheduled.

#[derive(Debug, Clone)]
pub struct OpenLoop {
    start_ns: u64,
    interval_ns: f64,
    next: u64,
    total: u64,
}

impl OpenLoop {
    /// `total` sends at `rate_per_s`, the first due at `start_ns`.
    pub fn new(start_ns: u64, rate_per_s: f64, total: u64) -> Self {
        assert!(rate_per_s > 0.0);
        Self {
            start_ns,
            interval_ns: 1e9 / rate_per_s,
            next: 0,
            total,
        }
    }

    /// Intended time of the next send if it is due at `now_ns`.
    pub fn due(&mut self, now_ns: u64) -> Option<u64> {
        if self.next >= self.total {
            return None;
        }
        let intended = self.intended(self.next);
        if intended > now_ns {
            return None;
        }
        self.next += 1;
        Some(intended)
    }

    /// When the next send is due (None when all are sent).
    pub fn next_due_ns(&self) -> Option<u64> {
        (self.next < self.total).then(|| self.intended(self.next))
    }

    fn intended(&self, index: u64) -> u64 {
        self.start_ns + (index as f64 * self.interval_ns) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_due_at_fixed_times_regardless_of_when_they_are_asked_for() {
        let mut schedule = OpenLoop::new(1_000, 1000.0, 5); // every 1 ms
        assert_eq!(schedule.due(999), None);
        assert_eq!(schedule.due(1_000), Some(1_000));
        assert_eq!(schedule.due(1_000), None);
        // The sender stalled for 3.5 ms: every missed send is still due, at its
        // original intended time (so its latency includes the stall).
        let now = 1_000 + 3_500_000;
        assert_eq!(schedule.due(now), Some(1_001_000));
        assert_eq!(schedule.due(now), Some(2_001_000));
        assert_eq!(schedule.due(now), Some(3_001_000));
        assert_eq!(schedule.due(now), None);
        assert_eq!(schedule.next_due_ns(), Some(4_001_000));
        assert_eq!(schedule.due(u64::MAX), Some(4_001_000));
        assert_eq!(schedule.due(u64::MAX), None, "total reached");
    }
}
