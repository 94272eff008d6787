//! A fatbin cut down to the code this GPU can load, before it is hashed and
//! sent: cuBLAS's fatbins carry cubins for every architecture and PTX, of
//! which an H200 loads the sm_90 cubins (a quarter of the bytes).
//!
//! The container (no public specification; the layout nvcc 13 writes, as
//! read by public tools and checked against the PyPI nvcc in
//! `tests/tests/libcuda.rs`): a 16-byte header (magic, version, header
//! size, payload size), then entries, each a header (kind at 0: 1 PTX,
//! 2 ELF cubin; its own size at 4; payload size at 8; architecture as
//! `10 * major + minor` at 0x1C; flags at 0x28) followed by its payload.
//! Entries are copied whole, never rewritten.
//!
//! What is dropped is what CUDA's rules say the driver could not load
//! anyway: cubins of another major version or of a higher minor one, PTX
//! of a higher architecture than the device's, and all PTX once a cubin
//! surely runs here (the driver prefers a cubin to a JIT compile). Anything
//! unexpected (a size that does not add up, a short header) keeps the image
//! whole.

use std::borrow::Cow;

const MAGIC: u32 = 0xBA55_ED50;
const KIND_PTX: u16 = 1;
const KIND_ELF: u16 = 2;
/// Bytes of an entry header that are read: up to the flags.
const ENTRY_MIN: usize = 0x30;
/// Cubin flags seen on code that runs on every device of its major
/// version from its minor up: 64-bit, Linux host, compressed. Others (an
/// arch-specific `sm_90a` cubin has 0x10_0000) make a cubin sure only on
/// exactly its architecture.
const PORTABLE_FLAGS: u64 = 0x1 | 0x10 | 0x8000;

/// One entry of a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// 1 PTX, 2 cubin, others kept as they are.
    pub kind: u16,
    /// `10 * major + minor` (90 for sm_90 and compute_90).
    pub arch: u32,
    /// Flag bits of the entry header.
    pub flags: u64,
    /// Where the entry (header and payload) starts and ends in the fatbin.
    pub range: (usize, usize),
}

fn read<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The fatbin's header length and entries, when `image` is exactly one
/// well-formed fatbin.
pub fn entries(image: &[u8]) -> Option<(usize, Vec<Entry>)> {
    if u32::from_le_bytes(read(image, 0)?) != MAGIC {
        return None;
    }
    let header = usize::from(u16::from_le_bytes(read(image, 6)?));
    let payload = usize::try_from(u64::from_le_bytes(read(image, 8)?)).ok()?;
    if header < 16 || header.checked_add(payload)? != image.len() {
        return None;
    }
    let mut entries = Vec::new();
    let mut at = header;
    while at < image.len() {
        let e = image.get(at..)?;
        let size = usize::try_from(u32::from_le_bytes(read(e, 4)?)).ok()?;
        let data = usize::try_from(u64::from_le_bytes(read(e, 8)?)).ok()?;
        let end = at.checked_add(size)?.checked_add(data)?;
        if size < ENTRY_MIN || end > image.len() {
            return None;
        }
        entries.push(Entry {
            kind: u16::from_le_bytes(read(e, 0)?),
            arch: u32::from_le_bytes(read(e, 0x1C)?),
            flags: u64::from_le_bytes(read(e, 0x28)?),
            range: (at, end),
        });
        at = end;
    }
    Some((header, entries))
}

/// `image` without the entries a device of compute capability
/// `major.minor` cannot load (see the module doc); the image itself when
/// nothing can go, nothing would be left, or it is not a fatbin this
/// parser understands.
pub fn for_device(image: &[u8], major: u32, minor: u32) -> Cow<'_, [u8]> {
    let Some((header, entries)) = entries(image) else {
        return Cow::Borrowed(image);
    };
    let device = major * 10 + minor;
    let cubin_runs = |e: &Entry| e.arch / 10 == major && e.arch % 10 <= minor;
    let sure = entries
        .iter()
        .any(|e| e.kind == KIND_ELF && cubin_runs(e) && (e.arch == device || e.flags & !PORTABLE_FLAGS == 0));
    let keep: Vec<&Entry> = entries
        .iter()
        .filter(|e| match e.kind {
            KIND_ELF => cubin_runs(e),
            KIND_PTX => !sure && e.arch <= device,
            _ => true,
        })
        .collect();
    if keep.is_empty() || keep.len() == entries.len() {
        return Cow::Borrowed(image);
    }
    let payload: usize = keep.iter().map(|e| e.range.1 - e.range.0).sum();
    let mut out = Vec::with_capacity(header + payload);
    out.extend_from_slice(&image[..header]);
    out[8..16].copy_from_slice(&(payload as u64).to_le_bytes());
    for e in keep {
        out.extend_from_slice(&image[e.range.0..e.range.1]);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fatbin of `(kind, arch, flags, payload length)` entries, each
    /// payload filled with its index.
    fn fatbin(spec: &[(u16, u32, u64, usize)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, &(kind, arch, flags, len)) in spec.iter().enumerate() {
            let mut h = [0u8; 64];
            h[0..2].copy_from_slice(&kind.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
            h[0x1C..0x20].copy_from_slice(&arch.to_le_bytes());
            h[0x28..0x30].copy_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend(std::iter::repeat_n(i as u8, len));
        }
        let mut out = MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend(body);
        out
    }

    fn kept(image: &[u8], major: u32, minor: u32) -> Vec<(u16, u32)> {
        let out = for_device(image, major, minor);
        entries(&out).expect("a fatbin").1.iter().map(|e| (e.kind, e.arch)).collect()
    }

    const ALL: [(u16, u32, u64, usize); 6] = [
        (KIND_ELF, 75, 0x11, 8),
        (KIND_PTX, 75, 0x8011, 16),
        (KIND_ELF, 86, 0x11, 24),
        (KIND_ELF, 90, 0x11, 8),
        (KIND_PTX, 90, 0x8011, 8),
        (KIND_ELF, 100, 0x11, 8),
    ];

    #[test]
    fn keeps_the_cubins_that_run_and_ptx_only_without_one() {
        let img = fatbin(&ALL);
        assert_eq!(kept(&img, 9, 0), [(KIND_ELF, 90)]);
        assert_eq!(kept(&img, 8, 9), [(KIND_ELF, 86)], "a lower minor runs");
        assert_eq!(kept(&img, 12, 0), [(KIND_PTX, 75), (KIND_PTX, 90)], "no cubin: the PTX it can compile");
        assert_eq!(kept(&img, 8, 0), [(KIND_PTX, 75)]);
        assert_eq!(for_device(&img, 7, 0).as_ptr(), img.as_ptr(), "nothing loads: sent whole");
        let out = for_device(&img, 9, 0);
        assert_eq!(&out[..8], &img[..8]);
        assert_eq!(u64::from_le_bytes(out[8..16].try_into().expect("8 bytes")), (out.len() - 16) as u64);
        assert!(out[16 + 64..].iter().all(|&b| b == 3), "the sm_90 payload, copied");
    }

    #[test]
    fn arch_specific_cubins_are_sure_only_on_their_arch() {
        let img = fatbin(&[(KIND_ELF, 90, 0x10_0011, 8), (KIND_PTX, 90, 0x8011, 8)]);
        assert_eq!(kept(&img, 9, 0), [(KIND_ELF, 90)]);
        assert_eq!(kept(&img, 9, 1), [(KIND_ELF, 90), (KIND_PTX, 90)], "not sure on 9.1: the PTX stays");
        let unknown = fatbin(&[(KIND_ELF, 90, 0x11, 8), (0x40, 0, 0, 8)]);
        assert_eq!(kept(&unknown, 9, 0), [(KIND_ELF, 90), (0x40, 0)], "unknown kinds stay");
    }

    #[test]
    fn malformed_images_are_sent_whole() {
        let img = fatbin(&ALL);
        for bad in [
            img[..img.len() - 1].to_vec(),
            [img.as_slice(), &[0]].concat(),
            {
                let mut b = img.clone();
                b[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            },
            {
                let mut b = img.clone();
                b[16 + 4..16 + 8].copy_from_slice(&8u32.to_le_bytes());
                b
            },
            img[..20].to_vec(),
            b".version 8.0\n".to_vec(),
        ] {
            assert!(matches!(for_device(&bad, 9, 0), Cow::Borrowed(_)), "{} bytes", bad.len());
        }
    }

    proptest::proptest! {
        #![proptest_config(gpupool_proto::fuzz::config(512))]

        /// Any bytes behind a fatbin header, and valid fatbins with edits:
        /// the parser's ranges lie inside the image and tile it; what is
        /// cut is the image itself or a fatbin of a subset of its entries.
        #[test]
        fn any_image(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            edits in gpupool_proto::fuzz::mutations(),
            spec in proptest::collection::vec((1u16..4, 50u32..130, proptest::prelude::any::<u64>(), 0usize..64), 0..6),
            raw in proptest::prelude::any::<bool>(),
            major in 5u32..13,
            minor in 0u32..10,
        ) {
            let image = if raw {
                let mut b = MAGIC.to_le_bytes().to_vec();
                b.extend_from_slice(&[1, 0, 16, 0]);
                b.extend_from_slice(&(body.len() as u64).to_le_bytes());
                b.extend(body);
                gpupool_proto::fuzz::mutate(b, &edits)
            } else {
                gpupool_proto::fuzz::mutate(fatbin(&spec), &edits)
            };
            if let Some((header, list)) = entries(&image) {
                let mut at = header;
                for e in &list {
                    proptest::prop_assert_eq!(e.range.0, at);
                    proptest::prop_assert!(e.range.0 < e.range.1 && e.range.1 <= image.len());
                    at = e.range.1;
                }
                proptest::prop_assert_eq!(at, image.len());
            }
            let out = for_device(&image, major, minor);
            if let Cow::Owned(out) = out {
                let (_, before) = entries(&image).expect("cut only when parsed");
                let (_, after) = entries(&out).expect("a fatbin");
                proptest::prop_assert!(!after.is_empty() && after.len() < before.len());
                proptest::prop_assert!(out.len() < image.len());
            }
        }
    }
}
