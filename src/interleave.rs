//! Which running request's step the gateway sends next (docs/generate-api.md, "Several requests
//! at once"). The stages of a pipeline idle while one request waits for its own token; with several
//! requests in flight each stage works on another request's step. No ROS: the scheduler hands in
//! what it knows of each request and sends the steps returned, in order.

/// One running request as the gateway sees it when it fills the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub request_id: u64,
    /// Its steps sent without their output yet.
    pub in_flight: usize,
    /// Its steps whose token ids are known and that are not sent: prompt chunks (or tokens fed
    /// again after a restart) are known ahead; a new token only once the last step's output is back.
    pub ready: usize,
    /// When it last had a step sent (a counter the caller keeps; lower = longer ago).
    pub last_sent: u64,
}

/// The requests whose next step to send now, one entry per step, in order: while fewer than
/// `window` steps are in flight overall, the request with the fewest steps in flight sends one,
/// ties going to the one that waited longest (then the oldest request). A request decoding one
/// token at a time is never starved by another's prompt, and each gets an equal share.
pub fn next_steps(lanes: &[Lane], window: usize) -> Vec<u64> {
    let mut lanes = lanes.to_vec();
    let mut in_flight: usize = lanes.iter().map(|l| l.in_flight).sum();
    let mut clock = lanes.iter().map(|l| l.last_sent).max().unwrap_or(0);
    let mut out = Vec::new();
    while in_flight < window {
        let Some(next) =
            lanes.iter_mut().filter(|l| l.ready > 0).min_by_key(|l| (l.in_flight, l.last_sent, l.request_id))
        else {
            break;
        };
        next.ready -= 1;
        next.in_flight += 1;
        clock += 1;
        next.last_sent = clock;
        in_flight += 1;
        out.push(next.request_id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lane(request_id: u64, in_flight: usize, ready: usize, last_sent: u64) -> Lane {
        Lane { request_id, in_flight, ready, last_sent }
    }

    #[test]
    fn decoding_requests_go_before_a_prompt_that_could_fill_the_pipeline() {
        // Request 1 has 10 prompt chunks known, 2 and 3 one token each; 4 stages.
        let lanes = [lane(1, 0, 10, 0), lane(2, 0, 1, 0), lane(3, 0, 1, 0)];
        assert_eq!(next_steps(&lanes, 4), vec![1, 2, 3, 1]);
        // The prompt's two chunks in flight: the token goes first.
        let lanes = [lane(1, 2, 8, 5), lane(2, 0, 1, 4)];
        assert_eq!(next_steps(&lanes, 4), vec![2, 1]);
    }

    #[test]
    fn nothing_is_sent_beyond_the_window_or_without_known_ids() {
        assert!(next_steps(&[lane(1, 4, 3, 0)], 4).is_empty());
        assert!(next_steps(&[lane(1, 1, 0, 0), lane(2, 0, 0, 0)], 4).is_empty());
        assert!(next_steps(&[], 4).is_empty());
    }

    #[test]
    fn ties_go_to_the_request_that_waited_longest() {
        let lanes = [lane(1, 0, 1, 9), lane(2, 0, 1, 3), lane(3, 0, 1, 7)];
        assert_eq!(next_steps(&lanes, 2), vec![2, 3]);
    }

    proptest! {
        /// Against the rule stated plainly: never above the window, every known step sent when
        /// there is room, and no request gets a second step in flight while another with a
        /// known step has none more than it had.
        #[test]
        fn fills_the_window_fairly(
            raw in prop::collection::vec((0usize..4, 0usize..6, 0u64..20), 0..6),
            window in 1usize..8,
        ) {
            let lanes: Vec<Lane> =
                raw.iter().enumerate().map(|(i, &(f, r, t))| lane(i as u64 + 1, f, r, t)).collect();
            let sent = next_steps(&lanes, window);
            let before: usize = lanes.iter().map(|l| l.in_flight).sum();
            let known: usize = lanes.iter().map(|l| l.ready).sum();
            prop_assert_eq!(sent.len(), window.saturating_sub(before).min(known));
            let mut after: Vec<(usize, usize)> = lanes.iter().map(|l| (l.in_flight, l.ready)).collect();
            for id in &sent {
                let i = (*id - 1) as usize;
                // The chosen one had the fewest in flight among those with a known step.
                let fewest = after.iter().filter(|a| a.1 > 0).map(|a| a.0).min();
                prop_assert_eq!(Some(after[i].0), fewest);
                after[i].0 += 1;
                after[i].1 -= 1;
            }
        }
    }
}
