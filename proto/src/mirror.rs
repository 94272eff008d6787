//! Change detection for mapped host memory, shared by client and server
//! (`MirrorAdd`): both keep a shadow of a mirrored range as the other side
//! last saw it and send only the chunks that differ from it.

/// Unit of change detection.
pub const CHUNK: usize = 4096;

/// Where bytes written at `[addr, addr + len)` land in a mirrored range
/// `[start, start + range_len)`: `(offset in the bytes, offset in the
/// range, length)`, or `None` when they do not meet.
pub fn overlap(addr: u64, len: usize, start: u64, range_len: usize) -> Option<(usize, usize, usize)> {
    let end = addr.saturating_add(len as u64);
    let range_end = start.saturating_add(range_len as u64);
    let (from, to) = (addr.max(start), end.min(range_end));
    (from < to).then(|| ((from - addr) as usize, (from - start) as usize, (to - from) as usize))
}

/// Where `now` differs from `shadow`, as (offset, length) runs of whole
/// chunks (the last one cut to the end). Both slices have the same length.
pub fn changed_runs(shadow: &[u8], now: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (a, b)) in shadow.chunks(CHUNK).zip(now.chunks(CHUNK)).enumerate() {
        if a == b {
            continue;
        }
        let start = i * CHUNK;
        match runs.last_mut() {
            Some((s, len)) if *s + *len == start => *len += b.len(),
            _ => runs.push((start, b.len())),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_clipped_to_the_range() {
        assert_eq!(overlap(90, 30, 100, 100), Some((10, 0, 20)));
        assert_eq!(overlap(190, 30, 100, 100), Some((0, 90, 10)));
        assert_eq!(overlap(120, 10, 100, 100), Some((0, 20, 10)));
        assert_eq!(overlap(200, 10, 100, 100), None);
        assert_eq!(overlap(90, 10, 100, 100), None);
    }

    #[test]
    fn runs_merge_adjacent_chunks_and_cut_the_last() {
        let shadow = vec![0u8; 3 * CHUNK + 10];
        let mut now = shadow.clone();
        now[5] = 1; // chunk 0
        now[CHUNK + 1] = 1; // chunk 1, merged with 0
        now[3 * CHUNK + 9] = 1; // short last chunk
        assert_eq!(changed_runs(&shadow, &now), vec![(0, 2 * CHUNK), (3 * CHUNK, 10)]);
        assert!(changed_runs(&shadow, &shadow).is_empty());
    }
}
