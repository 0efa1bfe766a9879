//! Protects the identity server and the service from each other: a cap on concurrent
//! introspections (excess fails fast with 503 rather than queueing) and a circuit breaker that,
//! after repeated IdP failures, fails fast for a while and then lets one probe through before
//! closing again.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{IdpError, Introspect, Introspected};
use crate::BoxFuture;
use crate::config::GuardConfig;
use crate::metrics;
use crate::token::Token;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// An [`Introspect`] wrapped in a concurrency cap and a circuit breaker.
pub struct Guarded<I> {
    inner: I,
    permits: Semaphore,
    state: Mutex<State>,
    config: GuardConfig,
}

impl<I: Introspect> Guarded<I> {
    pub fn new(inner: I, config: GuardConfig) -> Self {
        metrics::circuit_state(metrics::Circuit::Closed);
        Self {
            inner,
            permits: Semaphore::new(config.max_concurrent.max(1)),
            state: Mutex::new(State::Closed { failures: 0 }),
            config,
        }
    }

    /// Admits a call, or says why not. `Ok(true)` marks the half-open probe.
    fn admit(&self) -> Result<bool, IdpError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            State::Closed { .. } => Ok(false),
            State::Open { until } if Instant::now() < until => Err(IdpError::CircuitOpen),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                metrics::circuit_state(metrics::Circuit::HalfOpen);
                Ok(true)
            }
            State::HalfOpen { probing: true } => Err(IdpError::CircuitOpen),
        }
    }

    fn record(&self, probe: bool, result: &Result<Introspected, IdpError>) {
        let failed = matches!(result, Err(e) if e.is_idp_failure());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let next = match (*state, failed) {
            (_, false) => State::Closed { failures: 0 },
            (State::HalfOpen { .. }, true) if probe => self.open(),
            (State::Closed { failures }, true) => {
                let failures = failures + 1;
                if self.config.failure_threshold > 0 && failures >= self.config.failure_threshold {
                    self.open()
                } else {
                    State::Closed { failures }
                }
            }
            // A call admitted before the circuit opened finished late: the state stands.
            (current, true) => current,
        };
        if next != *state {
            metrics::circuit_state(match next {
                State::Closed { .. } => metrics::Circuit::Closed,
                State::Open { .. } => metrics::Circuit::Open,
                State::HalfOpen { .. } => metrics::Circuit::HalfOpen,
            });
            if matches!(next, State::Open { .. }) {
                tracing::warn!(open_for = ?self.config.open_for, "identity server failing: circuit open");
            } else if matches!(*state, State::HalfOpen { .. } | State::Open { .. }) {
                tracing::info!("identity server answering again: circuit closed");
            }
        }
        *state = next;
    }

    fn open(&self) -> State {
        State::Open {
            until: saturating_after(Instant::now(), self.config.open_for),
        }
    }
}

/// `now + duration`, or a far but representable instant when that overflows the clock (an
/// absurd `--circuit-open-duration` such as `18446744073709551615s` then means "open for good").
fn saturating_after(now: Instant, duration: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    now.checked_add(duration)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// Returns the half-open probe slot if the probing call is cancelled before it finishes.
struct ProbeSlot<'a, I: Introspect> {
    guard: &'a Guarded<I>,
    armed: bool,
}

impl<I: Introspect> Drop for ProbeSlot<'_, I> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.guard.state.lock().unwrap_or_else(|p| p.into_inner());
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
        }
    }
}

impl<I: Introspect> Introspect for Guarded<I> {
    fn introspect<'a>(&'a self, token: Token<'a>) -> BoxFuture<'a, Result<Introspected, IdpError>> {
        Box::pin(async move {
            let probe = match self.admit() {
                Ok(probe) => probe,
                Err(error) => {
                    metrics::introspection_rejected(error.label());
                    return Err(error);
                }
            };
            let mut slot = ProbeSlot {
                guard: self,
                armed: probe,
            };
            let Ok(_permit) = self.permits.try_acquire() else {
                metrics::introspection_rejected(IdpError::Overloaded.label());
                return Err(IdpError::Overloaded);
            };
            let result = self.inner.introspect(token).await;
            slot.armed = false;
            self.record(probe, &result);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::parse_bearer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Flaky {
        calls: AtomicUsize,
        failing: std::sync::atomic::AtomicBool,
        delay: Duration,
    }

    impl Introspect for Flaky {
        fn introspect<'a>(&'a self, _: Token<'a>) -> BoxFuture<'a, Result<Introspected, IdpError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                if self.failing.load(Ordering::SeqCst) {
                    Err(IdpError::Status(500))
                } else {
                    Ok(Introspected::Inactive)
                }
            })
        }
    }

    fn guarded(delay: Duration, max_concurrent: usize) -> Guarded<Flaky> {
        Guarded::new(
            Flaky {
                calls: AtomicUsize::new(0),
                failing: true.into(),
                delay,
            },
            GuardConfig {
                max_concurrent,
                failure_threshold: 3,
                open_for: Duration::from_secs(5),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_repeated_failures_then_probes_and_closes() {
        let guard = guarded(Duration::ZERO, 10);
        let header = "Bearer t".to_string();
        let token = parse_bearer(&header, 10).unwrap();
        for _ in 0..3 {
            assert_eq!(guard.introspect(token).await, Err(IdpError::Status(500)));
        }
        // Open: fails fast without calling the IdP.
        assert_eq!(guard.introspect(token).await, Err(IdpError::CircuitOpen));
        assert_eq!(guard.inner.calls.load(Ordering::SeqCst), 3);

        // After the open period one probe goes through; it fails, so the circuit reopens.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(guard.introspect(token).await, Err(IdpError::Status(500)));
        assert_eq!(guard.introspect(token).await, Err(IdpError::CircuitOpen));
        assert_eq!(guard.inner.calls.load(Ordering::SeqCst), 4);

        // The IdP recovers: the next probe closes the circuit.
        guard.inner.failing.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(guard.introspect(token).await, Ok(Introspected::Inactive));
        assert_eq!(guard.introspect(token).await, Ok(Introspected::Inactive));
        assert_eq!(guard.inner.calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_probe_at_a_time_and_a_cancelled_probe_frees_the_slot() {
        let guard = guarded(Duration::from_secs(1), 10);
        guard.inner.failing.store(true, Ordering::SeqCst);
        let header = "Bearer t".to_string();
        let token = parse_bearer(&header, 10).unwrap();
        for _ in 0..3 {
            let _ = guard.introspect(token).await;
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        // The probe is cancelled mid-call…
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), guard.introspect(token)).await;
        assert!(cancelled.is_err());
        // …so the next call may probe instead of the circuit sticking half-open.
        guard.inner.failing.store(false, Ordering::SeqCst);
        let (a, b) = tokio::join!(guard.introspect(token), guard.introspect(token));
        assert_eq!(a, Ok(Introspected::Inactive));
        assert_eq!(b, Err(IdpError::CircuitOpen));
    }

    #[tokio::test(start_paused = true)]
    async fn excess_concurrency_fails_fast() {
        let guard = guarded(Duration::from_secs(1), 2);
        guard.inner.failing.store(false, Ordering::SeqCst);
        let header = "Bearer t".to_string();
        let token = parse_bearer(&header, 10).unwrap();
        let (a, b, c) = tokio::join!(
            guard.introspect(token),
            guard.introspect(token),
            guard.introspect(token)
        );
        let results = [a, b, c];
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
        assert!(results.contains(&Err(IdpError::Overloaded)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_open_duration_saturates_instead_of_panicking() {
        let guard = Guarded::new(
            Flaky {
                calls: AtomicUsize::new(0),
                failing: true.into(),
                delay: Duration::ZERO,
            },
            GuardConfig {
                max_concurrent: 10,
                failure_threshold: 1,
                // What `--circuit-open-duration 18446744073709551615s` parses to.
                open_for: Duration::from_secs(u64::MAX),
            },
        );
        let header = "Bearer t".to_string();
        let token = parse_bearer(&header, 10).unwrap();
        assert_eq!(guard.introspect(token).await, Err(IdpError::Status(500)));
        assert_eq!(guard.introspect(token).await, Err(IdpError::CircuitOpen));
        tokio::time::advance(Duration::from_secs(10 * 365 * 24 * 3600)).await;
        assert_eq!(guard.introspect(token).await, Err(IdpError::CircuitOpen));
        assert_eq!(guard.inner.calls.load(Ordering::SeqCst), 1);

        let now = Instant::now();
        assert!(saturating_after(now, Duration::MAX) > now);
    }

    #[test]
    fn only_the_idp_failing_counts_as_failure() {
        assert!(!IdpError::Status(401).is_idp_failure());
        assert!(!IdpError::Status(400).is_idp_failure());
        assert!(IdpError::Timeout.is_idp_failure());
        assert!(IdpError::BadResponse("x").is_idp_failure());
        assert!(!IdpError::CircuitOpen.is_idp_failure());
    }
}
