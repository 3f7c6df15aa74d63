//! A route's own limits (SPEC §3, `rate_limit`, `burst`, `max_body_bytes`): how they are
//! written and checked, and the token bucket that counts a route's requests.
//!
//! The bucket is hand-written rather than `governor`'s (README, dependency notes): it is
//! one atomic word holding the GCRA "theoretical arrival time", updated by compare and
//! swap, so all of the agent's connections share it without a lock. Its arithmetic takes
//! the time as an argument ([`Bucket::take_at`]), which is the tests' mock clock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A scalar exactly as the file wrote it, for the keys whose wrong type must still name
/// `routes[i].<key>` (a YAML or JSON type error would name only a line).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Int(i128),
    Float(f64),
    Text(String),
    Bool(bool),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Text(s) => write!(f, "{s:?}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// Written back as it was read (`routes suggest` copies a file's routes unchanged).
impl Serialize for Scalar {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Scalar::Int(i) => match i64::try_from(*i) {
                Ok(small) => s.serialize_i64(small),
                Err(_) => s.serialize_i128(*i),
            },
            Scalar::Float(x) => s.serialize_f64(*x),
            Scalar::Text(t) => s.serialize_str(t),
            Scalar::Bool(b) => s.serialize_bool(*b),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A positive integer that fits `T`, or why not.
pub(super) fn positive<T: TryFrom<i128>>(value: &Scalar) -> Result<T, String> {
    match value {
        Scalar::Int(i) if *i > 0 => T::try_from(*i).map_err(|_| format!("{value} is too large")),
        _ => Err(format!("{value} is not a positive integer")),
    }
}

/// The span a rate is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    Second,
    Minute,
    Hour,
}

impl Per {
    fn length(self) -> Duration {
        match self {
            Per::Second => Duration::from_secs(1),
            Per::Minute => Duration::from_secs(60),
            Per::Hour => Duration::from_secs(3600),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Per::Second => "s",
            Per::Minute => "m",
            Per::Hour => "h",
        }
    }
}

/// A route's `rate_limit` and `burst`, and the bucket that counts its requests.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Requests per `per`.
    pub requests: u32,
    pub per: Per,
    /// The bucket's size: `requests` unless `burst` says otherwise.
    pub burst: u32,
    /// Shared by every clone of the route, and across a reload that keeps the route
    /// ([`super::RouteTable::keep_buckets_from`]).
    pub(crate) bucket: std::sync::Arc<Bucket>,
}

impl RateLimit {
    /// Parses `rate_limit` (`N/s`, `N/m`, `N/h`) and `burst`; starts a full bucket.
    pub(super) fn parse(rate: &Scalar, burst: Option<&Scalar>) -> Result<RateLimit, RateError> {
        let Scalar::Text(text) = rate else {
            return Err(RateError::Rate(format!("{rate} is not N/s, N/m or N/h")));
        };
        let (n, unit) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| RateError::Rate(format!("{text:?} is not N/s, N/m or N/h")))?;
        let per = match unit {
            "s" => Per::Second,
            "m" => Per::Minute,
            "h" => Per::Hour,
            _ => {
                return Err(RateError::Rate(format!("{text:?}: the unit is s, m or h")));
            }
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RateError::Rate(format!(
                "{text:?}: N is a positive integer"
            )));
        }
        let requests = match n.parse::<u32>() {
            Ok(0) => {
                return Err(RateError::Rate(format!(
                    "{text:?}: N is a positive integer"
                )));
            }
            Ok(n) => n,
            Err(_) => {
                return Err(RateError::Rate(format!(
                    "{text:?}: N is larger than {}",
                    u32::MAX
                )));
            }
        };
        let burst = match burst {
            None => requests,
            Some(b) => positive::<u32>(b).map_err(RateError::Burst)?,
        };
        Ok(RateLimit {
            requests,
            per,
            burst,
            bucket: std::sync::Arc::new(Bucket::new(per.length() / requests, burst)),
        })
    }

    /// The same limit as `other` (rate and burst): its bucket can be kept.
    pub(super) fn same_as(&self, other: &RateLimit) -> bool {
        self.requests == other.requests && self.per == other.per && self.burst == other.burst
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.requests, self.per.unit())
    }
}

/// Which key a bad rate names.
#[derive(Debug)]
pub(super) enum RateError {
    Rate(String),
    Burst(String),
}

/// A token bucket as GCRA: the state is the "theoretical arrival time" `tat`, the moment
/// the bucket would be full again, in nanoseconds since `epoch`. A request at `now` takes
/// a token when `max(tat, now) + interval` is at most `size * interval` ahead of `now`
/// (so a bucket that has been idle is full, never fuller); one that finds it further
/// ahead is refused and changes nothing.
pub(crate) struct Bucket {
    epoch: Instant,
    tat: AtomicU64,
    /// Time for one token to come back, in nanoseconds (at least 1).
    interval: u64,
    /// How far ahead of now `tat` may be: `size * interval`.
    depth: u64,
}

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("interval_ns", &self.interval)
            .field("depth_ns", &self.depth)
            .finish_non_exhaustive()
    }
}

impl Bucket {
    /// A full bucket of `size` tokens, one coming back every `interval`.
    pub(crate) fn new(interval: Duration, size: u32) -> Bucket {
        let interval = u64::try_from(interval.as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Bucket {
            epoch: Instant::now(),
            tat: AtomicU64::new(0),
            interval,
            depth: interval.saturating_mul(size.into()),
        }
    }

    /// Takes a token at `now`; when the bucket is empty, how long until the next one.
    pub(crate) fn take(&self, now: Instant) -> Result<(), Duration> {
        let since = now.saturating_duration_since(self.epoch);
        self.take_at(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }

    /// [`Bucket::take`] at `now` nanoseconds after the bucket was made.
    pub(crate) fn take_at(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(self.interval);
            let ahead = next - now;
            if ahead > self.depth {
                return Err(Duration::from_nanos(ahead - self.depth));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limit(rate: &str, burst: Option<i128>) -> Result<RateLimit, RateError> {
        RateLimit::parse(&Scalar::Text(rate.into()), burst.map(Scalar::Int).as_ref())
    }

    #[test]
    fn rates_parse_and_bad_ones_name_their_key() {
        let l = limit("60/m", None).unwrap();
        assert_eq!((l.requests, l.per, l.burst), (60, Per::Minute, 60));
        assert_eq!(l.to_string(), "60/m");
        let l = limit("5/s", Some(2)).unwrap();
        assert_eq!((l.requests, l.per, l.burst), (5, Per::Second, 2));
        assert_eq!(limit("1/h", None).unwrap().per, Per::Hour);
        for bad in [
            "0/m",
            "10/d",
            "1.5/s",
            "-1/s",
            "+5/s",
            "5",
            "/s",
            "5/",
            "5/S",
            "five/s",
            "5 /s",
            "99999999999/s",
            "",
        ] {
            assert!(
                matches!(limit(bad, None), Err(RateError::Rate(_))),
                "{bad:?} was accepted"
            );
        }
        assert!(
            matches!(limit("99999999999/s", None), Err(RateError::Rate(m)) if m.contains("larger than"))
        );
        for bad in [0, -3, 1 << 40] {
            assert!(
                matches!(limit("5/s", Some(bad)), Err(RateError::Burst(_))),
                "burst {bad} was accepted"
            );
        }
        for bad in [Scalar::Int(5), Scalar::Float(1.5), Scalar::Bool(true)] {
            assert!(matches!(
                RateLimit::parse(&bad, None),
                Err(RateError::Rate(_))
            ));
        }
        assert!(matches!(
            RateLimit::parse(&Scalar::Text("5/s".into()), Some(&Scalar::Float(2.5))),
            Err(RateError::Burst(_))
        ));
    }

    #[test]
    fn a_full_bucket_gives_its_burst_then_one_token_per_interval() {
        // 5/s with a burst of 5: one token every 200 ms.
        let b = Bucket::new(Duration::from_millis(200), 5);
        for _ in 0..5 {
            assert_eq!(b.take_at(0), Ok(()));
        }
        assert_eq!(b.take_at(0), Err(Duration::from_millis(200)));
        // A refusal spends nothing: still 200 ms from the start, 150 ms later 50 ms left.
        assert_eq!(b.take_at(0), Err(Duration::from_millis(200)));
        assert_eq!(b.take_at(150_000_000), Err(Duration::from_millis(50)));
        assert_eq!(b.take_at(200_000_000), Ok(()));
        assert_eq!(b.take_at(200_000_000), Err(Duration::from_millis(200)));
        // Idle for an hour: full again, never fuller.
        let later = 3600 * SEC;
        for _ in 0..5 {
            assert_eq!(b.take_at(later), Ok(()));
        }
        assert!(b.take_at(later).is_err());
    }

    #[test]
    fn a_burst_smaller_or_larger_than_the_rate() {
        // 60/m, burst 1: one request, then a second's wait.
        let b = Bucket::new(Duration::from_secs(1), 1);
        assert_eq!(b.take_at(0), Ok(()));
        assert_eq!(b.take_at(SEC / 4), Err(Duration::from_millis(750)));
        assert_eq!(b.take_at(SEC), Ok(()));
        // 1/h, burst 3: three at once, then an hour for the next.
        let b = Bucket::new(Duration::from_secs(3600), 3);
        for _ in 0..3 {
            assert_eq!(b.take_at(10 * SEC), Ok(()));
        }
        assert_eq!(b.take_at(10 * SEC), Err(Duration::from_secs(3600)));
        assert_eq!(b.take_at(3610 * SEC), Ok(()));
    }

    #[test]
    fn huge_bursts_and_rates_do_not_overflow() {
        let b = Bucket::new(Duration::from_secs(3600), u32::MAX);
        for _ in 0..1000 {
            assert_eq!(b.take_at(u64::MAX / 2), Ok(()));
        }
        // Under a nanosecond per token: one nanosecond, not none (which would be no limit).
        let b = Bucket::new(Duration::from_secs(1) / u32::MAX, 1);
        assert_eq!(b.take_at(10 * SEC), Ok(()));
        assert_eq!(b.take_at(10 * SEC), Err(Duration::from_nanos(1)));
    }

    #[test]
    fn concurrent_takers_share_one_bucket() {
        let b = std::sync::Arc::new(Bucket::new(Duration::from_secs(3600), 100));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || (0..50).filter(|_| b.take_at(SEC).is_ok()).count())
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 100);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3600)), 3600);
    }

    #[test]
    fn sizes_are_positive_integers() {
        assert_eq!(positive::<u64>(&Scalar::Int(1)), Ok(1));
        for bad in [
            Scalar::Int(0),
            Scalar::Int(-5),
            Scalar::Float(1.5),
            Scalar::Text("1000".into()),
            Scalar::Bool(true),
        ] {
            assert!(positive::<u64>(&bad).is_err(), "{bad:?}");
        }
    }
}
