//! The connect watchdog: how long a `/meta/connect` may take, and what repeated stalls mean.
//!
//! A held connect answers within the server's `advice.timeout` (30 s on CometD, 110 s on
//! Salesforce). One that has not answered within that plus a network allowance is stuck: a
//! half-open TCP connection, a proxy that swallowed the response, a server that stopped
//! answering. The client aborts it and connects again; after `max_stalls` stalls in a row it
//! starts over with a fresh handshake, because a session that keeps stalling is probably gone.
//! Pure logic: the caller owns the timers.

use std::time::Duration;

/// Connect deadlines and stall escalation.
#[derive(Debug, Clone)]
pub struct Watchdog {
    allowance: Duration,
    max_stalls: u32,
    stalls: u32,
}

/// What to do about a stalled connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallAction {
    /// Connect again at once.
    Reconnect,
    /// Too many stalls in a row: handshake again.
    Rehandshake,
}

impl Watchdog {
    /// A watchdog allowing `allowance` beyond the server's timeout, escalating after
    /// `max_stalls` consecutive stalls (at least 1).
    pub fn new(allowance: Duration, max_stalls: u32) -> Self {
        Watchdog {
            allowance,
            max_stalls: max_stalls.max(1),
            stalls: 0,
        }
    }

    /// The deadline of a connect the server may hold for `held`.
    pub fn deadline(&self, held: Duration) -> Duration {
        held + self.allowance
    }

    /// Counts a stall and says what to do.
    pub fn on_stall(&mut self) -> StallAction {
        self.stalls += 1;
        if self.stalls >= self.max_stalls {
            self.stalls = 0;
            StallAction::Rehandshake
        } else {
            StallAction::Reconnect
        }
    }

    /// Consecutive stalls so far.
    pub fn stalls(&self) -> u32 {
        self.stalls
    }

    /// A connect answered: the count starts over.
    pub fn on_answer(&mut self) {
        self.stalls = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalates_after_max_stalls_and_resets_on_answer() {
        let mut w = Watchdog::new(Duration::from_secs(10), 2);
        assert_eq!(
            w.deadline(Duration::from_secs(110)),
            Duration::from_secs(120)
        );
        assert_eq!(w.on_stall(), StallAction::Reconnect);
        w.on_answer();
        assert_eq!(w.on_stall(), StallAction::Reconnect);
        assert_eq!(w.on_stall(), StallAction::Rehandshake);
        assert_eq!(w.stalls(), 0);
    }
}
