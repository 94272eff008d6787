//! Mapped host memory, client side (see `MirrorAdd` in the protocol): a
//! range of host memory the program owns, mirrored by a device range of
//! the session that kernels use.
//!
//! Sans-I/O: [`Mirrors::pushes`] says which host bytes changed since both
//! sides last agreed (they are sent as copies before the next call), and
//! [`Mirrors::apply`] writes the device's changes from a reply into host
//! memory. Each range keeps a shadow of the agreed bytes; changes are found
//! in 4 KiB chunks. When both sides changed the same chunk between two
//! synchronizations the device's bytes win, as a program that follows
//! CUDA's rules for mapped memory never does that.

use gpupool_proto::mirror::changed_runs;
use std::collections::BTreeMap;

/// The host half of a mirrored range, owned by the caller (the drop-in
/// library's mapped allocations).
pub trait MirrorHost: Send + std::fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> usize;
    /// Copies the host bytes into `out` (`size()` bytes).
    fn read(&self, out: &mut [u8]);
    /// Writes `data` at `offset` (inside the range).
    fn write(&self, offset: usize, data: &[u8]);
}

#[derive(Debug)]
struct Range {
    host: Box<dyn MirrorHost>,
    /// The bytes both sides last agreed on.
    shadow: Vec<u8>,
}

/// The session's mirrored ranges by device address.
#[derive(Debug, Default)]
pub(crate) struct Mirrors {
    ranges: BTreeMap<u64, Range>,
    scratch: Vec<u8>,
}

impl Mirrors {
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds a range. The shadow starts unlike any host content (inverted),
    /// so the first [`pushes`](Self::pushes) sends all of it: the device
    /// half starts as the host's bytes.
    pub(crate) fn add(&mut self, addr: u64, host: Box<dyn MirrorHost>) {
        let mut shadow = vec![0u8; host.size()];
        host.read(&mut shadow);
        shadow.iter_mut().for_each(|b| *b = !*b);
        self.ranges.insert(addr, Range { host, shadow });
    }

    pub(crate) fn remove(&mut self, addr: u64) -> bool {
        self.ranges.remove(&addr).is_some()
    }

    /// Host bytes changed since both sides agreed, as (device address,
    /// bytes); the shadows take them as agreed.
    pub(crate) fn pushes(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (&addr, r) in &mut self.ranges {
            self.scratch.resize(r.shadow.len(), 0);
            r.host.read(&mut self.scratch);
            for (offset, len) in changed_runs(&r.shadow, &self.scratch) {
                let bytes = &self.scratch[offset..offset + len];
                r.shadow[offset..offset + len].copy_from_slice(bytes);
                out.push((addr + offset as u64, bytes.to_vec()));
            }
        }
        out
    }

    /// Applies the device's changes `[addr, addr + data.len())`: host
    /// memory and shadow take them. Bytes outside every range are ignored
    /// (a range removed meanwhile).
    /// Bytes the program copied into device memory (`memcpy_htod`): where
    /// they land in mirrored ranges, the host half and the shadow take them
    /// too (the server's shadow takes them as well, so nothing echoes).
    pub(crate) fn copy_in(&mut self, addr: u64, data: &[u8]) {
        let end = addr.saturating_add(data.len() as u64);
        for (&start, r) in self.ranges.range_mut(..end) {
            let Some((src, dst, n)) = gpupool_proto::mirror::overlap(addr, data.len(), start, r.shadow.len()) else {
                continue;
            };
            r.shadow[dst..dst + n].copy_from_slice(&data[src..src + n]);
            r.host.write(dst, &data[src..src + n]);
        }
    }

    pub(crate) fn apply(&mut self, addr: u64, data: &[u8]) {
        let Some((&start, r)) = self.ranges.range_mut(..=addr).next_back() else { return };
        let offset = (addr - start) as usize;
        let Some(end) = offset.checked_add(data.len()).filter(|&e| e <= r.shadow.len()) else { return };
        r.shadow[offset..end].copy_from_slice(data);
        r.host.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    struct Host(Arc<Mutex<Vec<u8>>>);

    impl MirrorHost for Host {
        fn size(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        fn read(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.lock().unwrap());
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.0.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn copies_into_device_memory_land_in_the_overlapping_host_halves_only() {
        let a = Host(Arc::new(Mutex::new(vec![0u8; 100])));
        let b = Host(Arc::new(Mutex::new(vec![0u8; 100])));
        let mut m = Mirrors::default();
        m.add(0x1000, Box::new(a.clone()));
        m.add(0x1064, Box::new(b.clone()));
        assert_eq!(m.pushes().len(), 2);
        // The last 10 bytes of `a`, the first 20 of `b`, and 10 past `b`.
        m.copy_in(0x1000 + 90, &[7u8; 30]);
        m.copy_in(0x1064 + 95, &[8u8; 10]);
        assert!(a.0.lock().unwrap()[90..].iter().all(|&x| x == 7));
        assert!(a.0.lock().unwrap()[..90].iter().all(|&x| x == 0));
        assert!(b.0.lock().unwrap()[..20].iter().all(|&x| x == 7));
        assert!(b.0.lock().unwrap()[95..].iter().all(|&x| x == 8));
        assert!(m.pushes().is_empty(), "the shadow took the bytes: nothing goes back");
    }

    #[test]
    fn first_push_is_everything_then_only_changes_and_device_bytes_land() {
        let host = Host(Arc::new(Mutex::new(vec![0u8; 5000])));
        let mut m = Mirrors::default();
        m.add(0x1000, Box::new(host.clone()));
        let first = m.pushes();
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].0, first[0].1.len()), (0x1000, 5000), "all of it, zeros included");
        assert!(m.pushes().is_empty());

        host.0.lock().unwrap()[4500] = 9;
        let second = m.pushes();
        assert_eq!(second.len(), 1);
        assert_eq!((second[0].0, second[0].1.len()), (0x1000 + 4096, 5000 - 4096));

        // Device changes: written to host memory, and not pushed back.
        m.apply(0x1000 + 10, &[1, 2, 3]);
        assert_eq!(&host.0.lock().unwrap()[10..13], &[1, 2, 3]);
        assert!(m.pushes().is_empty());
        // Outside any range, or running past its end: ignored.
        m.apply(0x1000 + 4999, &[1, 2]);
        m.apply(0x10, &[1]);
        assert_eq!(host.0.lock().unwrap()[4999], 0);
        assert!(m.remove(0x1000) && !m.remove(0x1000));
        assert!(m.is_empty());
    }
}
