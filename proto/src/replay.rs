//! Resumption's bookkeeping, without I/O: the frames one end sent that the
//! other may have lost with its connection.
//!
//! Both ends of a session keep one [`ReplayLog`]: the client its batches
//! until their replies arrive, the server its replies for a client that may
//! reattach. Frames are numbered by the batch sequence number (replies carry
//! their batch's); a frame numbered 0 lies outside the sequence (a reply to a
//! frame that could not be read) and is never kept. On a reattach the peer
//! names the last frame it has (`Resume.acked_seq` from the client,
//! `Welcome.resumed_seq` from the server); everything after it is sent again,
//! in order, by [`ReplayLog::replay_after`].

use bytes::Bytes;
use std::collections::VecDeque;

/// How much a [`ReplayLog`] keeps; beyond it the oldest frames are forgotten
/// and a reattach from before them can no longer be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimit {
    /// Most frames kept.
    pub frames: usize,
    /// Most bytes kept, all frames together.
    pub bytes: usize,
}

impl ReplayLimit {
    /// Keeps every frame until it is acknowledged (the sender bounds what
    /// it has in flight).
    pub const UNBOUNDED: Self = Self { frames: usize::MAX, bytes: usize::MAX };
}

/// Frames sent and not yet acknowledged, in sequence order.
#[derive(Debug, Clone)]
pub struct ReplayLog {
    kept: VecDeque<(u64, Bytes)>,
    kept_bytes: usize,
    limit: ReplayLimit,
    /// Newest sequence number dropped for the limit before it was
    /// acknowledged (0: none).
    forgotten: u64,
    /// Newest sequence number the peer acknowledged.
    acked: u64,
}

impl ReplayLog {
    pub fn new(limit: ReplayLimit) -> Self {
        Self { kept: VecDeque::new(), kept_bytes: 0, limit, forgotten: 0, acked: 0 }
    }

    /// Keeps `frame`, sent as number `seq`, for a replay. Numbers must grow
    /// from one call to the next; 0 is not kept.
    pub fn record(&mut self, seq: u64, frame: Bytes) {
        if seq == 0 || seq <= self.acked {
            return;
        }
        self.kept_bytes += frame.len();
        self.kept.push_back((seq, frame));
        while self.kept.len() > self.limit.frames || self.kept_bytes > self.limit.bytes {
            let Some((seq, old)) = self.kept.pop_front() else { break };
            self.kept_bytes -= old.len();
            self.forgotten = seq;
        }
    }

    /// The peer has every frame up to `seq`: they are no longer kept.
    pub fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.kept.front().is_some_and(|(s, _)| *s <= self.acked) {
            if let Some((_, old)) = self.kept.pop_front() {
                self.kept_bytes -= old.len();
            }
        }
    }

    /// [`Self::ack`] for the answer to frame `seq` just received; false,
    /// acknowledging nothing, when an answer at or after it came before
    /// (the same answer again, by another path).
    pub fn ack_new(&mut self, seq: u64) -> bool {
        if seq <= self.acked {
            return false;
        }
        self.ack(seq);
        true
    }

    /// The newest sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Whether every frame after `seq` is still kept: a peer that has the
    /// frames up to `seq` can be brought up to date.
    pub fn covers(&self, seq: u64) -> bool {
        seq >= self.forgotten
    }

    /// The frames after `seq` still kept, in order, to send again.
    pub fn replay_after(&self, seq: u64) -> Vec<Bytes> {
        self.kept.iter().filter(|(s, _)| *s > seq).map(|(_, b)| b.clone()).collect()
    }

    /// Frames kept.
    /// The frames kept, with their sequence numbers, in order.
    pub fn kept(&self) -> impl Iterator<Item = (u64, &Bytes)> {
        self.kept.iter().map(|(s, b)| (*s, b))
    }

    /// The last frame forgotten unacknowledged (0: none).
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// A log taken over from another peer (a migrated session): what it
    /// had acknowledged and forgotten; its kept frames are recorded after.
    pub fn taken_over(limit: ReplayLimit, acked: u64, forgotten: u64) -> Self {
        Self { forgotten, acked, ..Self::new(limit) }
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.kept_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(seq: u64, len: usize) -> Bytes {
        Bytes::from(vec![seq as u8; len])
    }

    #[test]
    fn an_answer_that_comes_again_is_refused_and_acknowledges_nothing() {
        let mut log = ReplayLog::new(ReplayLimit::UNBOUNDED);
        for seq in 1..=4 {
            log.record(seq, Bytes::from_static(b"abc"));
        }
        assert!(log.ack_new(2));
        assert!(!log.ack_new(2), "the same answer again");
        assert!(!log.ack_new(1), "an older one");
        assert_eq!((log.acked(), log.len()), (2, 2));
        assert!(log.ack_new(4));
        assert_eq!((log.acked(), log.len()), (4, 0));
    }

    #[test]
    fn keeps_what_is_not_acked_and_replays_it() {
        let mut log = ReplayLog::new(ReplayLimit::UNBOUNDED);
        for seq in 1..=5 {
            log.record(seq, frame(seq, 3));
        }
        log.ack(2);
        assert_eq!((log.len(), log.bytes(), log.acked()), (3, 9, 2));
        assert_eq!(log.replay_after(3), vec![frame(4, 3), frame(5, 3)]);
        assert_eq!(log.replay_after(2).len(), 3);
        assert!(log.covers(0));
        log.ack(5);
        assert!(log.is_empty() && log.bytes() == 0);
        assert!(log.replay_after(0).is_empty());
    }

    #[test]
    fn frames_outside_the_sequence_are_not_kept() {
        let mut log = ReplayLog::new(ReplayLimit::UNBOUNDED);
        log.record(0, frame(0, 10));
        assert!(log.is_empty());
        log.ack(4);
        log.record(3, frame(3, 10));
        assert!(log.is_empty(), "an acknowledged number is not kept again");
    }

    #[test]
    fn the_limit_forgets_the_oldest() {
        let mut log = ReplayLog::new(ReplayLimit { frames: 3, bytes: 100 });
        for seq in 1..=5 {
            log.record(seq, frame(seq, 10));
        }
        assert_eq!(log.len(), 3);
        assert!(!log.covers(1), "frame 2 is gone");
        assert!(log.covers(2) && log.covers(7));
        assert_eq!(log.replay_after(2), vec![frame(3, 10), frame(4, 10), frame(5, 10)]);

        let mut log = ReplayLog::new(ReplayLimit { frames: 100, bytes: 25 });
        for seq in 1..=3 {
            log.record(seq, frame(seq, 10));
        }
        assert_eq!((log.len(), log.bytes()), (2, 20));
        assert!(!log.covers(0) && log.covers(1));
        // A frame larger than the whole budget is not kept either.
        log.record(4, frame(4, 30));
        assert!(log.is_empty() && !log.covers(3) && log.covers(4));
    }

    /// One step of a session seen from the sender's side.
    #[derive(Debug, Clone)]
    enum Step {
        /// Send the next frame, of this many bytes.
        Send(usize),
        /// The peer receives this many of the frames in flight.
        Deliver(usize),
        /// The connection is lost with what was in flight; the peer
        /// reattaches and says what it has.
        Reattach,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0usize..40).prop_map(Step::Send),
            3 => (0usize..4).prop_map(Step::Deliver),
            1 => Just(Step::Reattach),
        ]
    }

    proptest! {
        /// Over any run of sends, deliveries, acknowledgements and
        /// connection losses, the peer receives every frame once, in order,
        /// whenever the log covers its reattach; and the log stays within
        /// its limit.
        #[test]
        fn every_frame_arrives_once_in_order(
            steps in proptest::collection::vec(step(), 0..200),
            frames in 1usize..12,
            bytes in 1usize..300,
        ) {
            let limit = ReplayLimit { frames, bytes };
            let mut log = ReplayLog::new(limit);
            let mut next = 1u64;
            // Frames on the wire towards the peer, in order.
            let mut in_flight: VecDeque<(u64, Bytes)> = VecDeque::new();
            let mut received: Vec<u64> = Vec::new();
            for s in steps {
                match s {
                    Step::Send(len) => {
                        let f = frame(next, len);
                        log.record(next, f.clone());
                        in_flight.push_back((next, f));
                        next += 1;
                    }
                    Step::Deliver(n) => {
                        for _ in 0..n {
                            let Some((seq, f)) = in_flight.pop_front() else { break };
                            prop_assert_eq!(&f, &frame(seq, f.len()), "frame {} arrives intact", seq);
                            received.push(seq);
                            // The peer's answer acknowledges it.
                            log.ack(seq);
                        }
                    }
                    Step::Reattach => {
                        in_flight.clear();
                        let have = received.last().copied().unwrap_or(0);
                        if !log.covers(have) {
                            // The session cannot be resumed: the run ends here.
                            prop_assert!(next - 1 - have > 0);
                            return Ok(());
                        }
                        let again = log.replay_after(have);
                        prop_assert_eq!(again.len() as u64, next - 1 - have, "every missing frame is replayed");
                        for (i, f) in again.into_iter().enumerate() {
                            in_flight.push_back((have + 1 + i as u64, f));
                        }
                    }
                }
                prop_assert!(log.len() <= limit.frames && log.bytes() <= limit.bytes);
                prop_assert!(log.replay_after(0).len() == log.len());
            }
            prop_assert!(received.iter().copied().eq(1..=received.len() as u64), "{received:?}");
        }

        /// `covers` is monotonic, and what it promises `replay_after` keeps.
        #[test]
        fn covers_is_monotonic(
            lens in proptest::collection::vec(0usize..50, 0..60),
            acks in proptest::collection::vec(0u64..70, 0..20),
            frames in 1usize..10,
        ) {
            let mut log = ReplayLog::new(ReplayLimit { frames, bytes: 200 });
            let mut acks = acks.into_iter();
            for (i, len) in lens.iter().enumerate() {
                let seq = i as u64 + 1;
                log.record(seq, frame(seq, *len));
                if i % 3 == 0 && let Some(a) = acks.next() {
                    log.ack(a.min(seq));
                }
            }
            let sent = lens.len() as u64;
            for have in 0..=sent {
                if log.covers(have) {
                    prop_assert!(log.covers(have + 1));
                    if have >= log.acked() {
                        prop_assert_eq!(log.replay_after(have).len() as u64, sent - have);
                    }
                }
            }
        }
    }
}
