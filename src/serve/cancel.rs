//! The one stop signal of a job: a [`CancelToken`].
//!
//! Every reason a job stops early goes through its token: the client went away
//! ([`StopReason::ClientGone`], set when its [`JobStream`](super::engine::JobStream) is dropped),
//! its deadline passed ([`StopReason::Deadline`], noticed lazily by [`CancelToken::reason`], so no
//! timer is needed), or the server cut running work off at the drain deadline
//! ([`StopReason::Shutdown`]). The queue, the worker between steps and the model inside a step
//! (through [`crate::model::stop`]) all ask the same token. The first reason wins; a token never
//! resets.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Why a job stopped before completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// Its deadline (`grpc-timeout`) passed.
    Deadline,
    /// Its client went away (cancelled the call, disconnected).
    ClientGone,
    /// The server is shutting down: the drain deadline passed.
    Shutdown,
}

impl StopReason {
    /// The metric label (`stylealign_dropped_total`, `stylealign_stop_seconds`).
    pub fn label(self) -> &'static str {
        match self {
            StopReason::Deadline => "deadline_exceeded",
            StopReason::ClientGone => "cancelled",
            StopReason::Shutdown => "shutting_down",
        }
    }
}

/// A stop that was requested: why, when, and after how many completed steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stop {
    pub reason: StopReason,
    /// When it was asked for (for a deadline: the deadline itself).
    pub at: Instant,
    /// Steps the job had completed then.
    pub at_step: u32,
}

#[derive(Debug)]
struct Inner {
    stop: OnceLock<Stop>,
    deadline: Option<Instant>,
    progress: AtomicU32,
}

/// A job's stop signal; clones share it. Cheap to check (an atomic load, and a clock read when
/// the job has a deadline).
#[derive(Clone, Debug)]
pub struct CancelToken(Arc<Inner>);

impl Default for CancelToken {
    fn default() -> Self {
        Self::new(None)
    }
}

impl CancelToken {
    /// A token that also fires by itself once `deadline` has passed.
    pub fn new(deadline: Option<Instant>) -> Self {
        Self(Arc::new(Inner { stop: OnceLock::new(), deadline, progress: AtomicU32::new(0) }))
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.0.deadline
    }

    /// Asks the job to stop; true when this call set the reason (the first reason wins).
    pub fn cancel(&self, reason: StopReason) -> bool {
        self.cancel_at(reason, Instant::now())
    }

    fn cancel_at(&self, reason: StopReason, at: Instant) -> bool {
        let stop = Stop { reason, at, at_step: self.0.progress.load(Ordering::SeqCst) };
        self.0.stop.set(stop).is_ok()
    }

    /// Why the job must stop, if it must (a passed deadline counts from now on).
    pub fn reason(&self) -> Option<StopReason> {
        self.stop().map(|s| s.reason)
    }

    /// The stop, if one was requested (or the deadline passed).
    pub fn stop(&self) -> Option<Stop> {
        if let Some(s) = self.0.stop.get() {
            return Some(*s);
        }
        let d = self.0.deadline?;
        if Instant::now() >= d {
            self.cancel_at(StopReason::Deadline, d);
            return self.0.stop.get().copied();
        }
        None
    }

    pub fn is_cancelled(&self) -> bool {
        self.stop().is_some()
    }

    /// Records the steps completed so far (kept with a later stop).
    pub fn set_progress(&self, steps: u32) {
        self.0.progress.store(steps, Ordering::SeqCst);
    }

    pub fn progress(&self) -> u32 {
        self.0.progress.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn first_reason_wins_and_clones_share() {
        let t = CancelToken::default();
        let u = t.clone();
        assert_eq!(t.reason(), None);
        t.set_progress(3);
        assert!(u.cancel(StopReason::ClientGone));
        assert!(!t.cancel(StopReason::Shutdown));
        assert_eq!(t.reason(), Some(StopReason::ClientGone));
        assert_eq!(t.stop().unwrap().at_step, 3);
    }

    #[test]
    fn a_deadline_fires_by_itself_dated_at_the_deadline() {
        let d = Instant::now() + Duration::from_millis(20);
        let t = CancelToken::new(Some(d));
        assert!(!t.is_cancelled());
        std::thread::sleep(Duration::from_millis(30));
        let s = t.stop().unwrap();
        assert_eq!(s.reason, StopReason::Deadline);
        assert_eq!(s.at, d);
        assert!(!t.cancel(StopReason::ClientGone));
    }
}
