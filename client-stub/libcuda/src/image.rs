//! Module images arrive as a bare pointer (`cuModuleLoadData` has no
//! length). The length follows from the image's own format:
//! - a fatbin wrapper (what the CUDA runtime registers) points to a fatbin;
//! - a fatbin has a header with its payload size;
//! - an ELF cubin ends at its last section or header table;
//! - PTX is NUL-terminated text.

use crate::abi::{CuError, CuResult};

const FATBIN_WRAPPER_MAGIC: u32 = 0x466243B1;
const FATBIN_MAGIC: u32 = 0xBA55ED50;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// No image is this large; a bigger computed length means a corrupt header.
const MAX_IMAGE: usize = 1 << 31;

/// Reads a `T` at `p + offset`.
///
/// # Safety
/// `p + offset` is readable for `size_of::<T>()` bytes.
unsafe fn read<T: Copy>(p: *const u8, offset: usize) -> T {
    // SAFETY: forwarded contract.
    unsafe { p.add(offset).cast::<T>().read_unaligned() }
}

/// The fatbin a fatbin wrapper points to (magic, version, data, ...).
///
/// # Safety
/// `p` points to a readable wrapper.
pub(crate) unsafe fn unwrap(p: *const u8) -> *const u8 {
    // SAFETY: a wrapper is 24 readable bytes; `data` is at offset 8.
    unsafe { read::<usize>(p, 8) as *const u8 }
}

/// The bytes of the image at `p`.
///
/// # Safety
/// `p` points to a complete image in one of the formats above (the CUDA
/// API's contract for module and library loads).
pub(crate) unsafe fn image<'a>(p: *const u8) -> CuResult<&'a [u8]> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: every image is at least 4 bytes (a magic or PTX text + NUL).
    let magic = unsafe { read::<u32>(p, 0) };
    // SAFETY (for the reads below): each read lies inside the header of the
    // format the magic named, which the caller guarantees is complete.
    let (start, len) = unsafe {
        if magic == FATBIN_WRAPPER_MAGIC {
            let inner = unwrap(p);
            if inner.is_null() || read::<u32>(inner, 0) != FATBIN_MAGIC {
                return Err(CuError::INVALID_IMAGE);
            }
            (inner, fatbin_len(inner))
        } else if magic == FATBIN_MAGIC {
            (p, fatbin_len(p))
        } else if read::<[u8; 4]>(p, 0) == ELF_MAGIC {
            (p, elf_len(p)?)
        } else {
            (p, std::ffi::CStr::from_ptr(p.cast()).to_bytes_with_nul().len())
        }
    };
    if len == 0 || len > MAX_IMAGE {
        return Err(CuError::INVALID_IMAGE);
    }
    // SAFETY: the format says the image spans `len` bytes from `start`.
    Ok(unsafe { std::slice::from_raw_parts(start, len) })
}

/// Most relocatable fatbins one linked image lists (one per object file
/// and device library of the program).
const MAX_PRELINKED: usize = 4096;

/// The relocatable fatbins a version-2 fatbin wrapper lists after its
/// image: a program built with `-rdc` registers its device-linked image
/// with them (a null-terminated array of pointers at offset 16), and when
/// the linked image has no code for the GPU (built for an older
/// architecture) the driver JIT-links these instead, its PTX with the
/// device runtime's code for the GPU. Empty for anything else.
///
/// # Safety
/// `p` points to a complete image (as for [`image`]); a version-2 wrapper's
/// array and the fatbins it points to are readable (the runtime filled
/// them in before the load).
pub(crate) unsafe fn prelinked<'a>(p: *const u8) -> CuResult<Vec<&'a [u8]>> {
    // SAFETY (reads below): the wrapper's 24 bytes, then the array's
    // entries up to its null end (the caller's contract).
    unsafe {
        if p.is_null() || read::<u32>(p, 0) != FATBIN_WRAPPER_MAGIC || read::<u32>(p, 4) != 2 {
            return Ok(Vec::new());
        }
        let list = read::<usize>(p, 16) as *const *const u8;
        let mut out = Vec::new();
        if list.is_null() {
            return Ok(out);
        }
        for i in 0..=MAX_PRELINKED {
            let entry = list.add(i).read_unaligned();
            if entry.is_null() {
                return Ok(out);
            }
            if i == MAX_PRELINKED {
                break;
            }
            let magic = read::<u32>(entry, 0);
            if magic != FATBIN_MAGIC && magic != FATBIN_WRAPPER_MAGIC {
                return Err(CuError::INVALID_IMAGE);
            }
            out.push(image(entry)?);
        }
        Err(CuError::INVALID_IMAGE)
    }
}

/// Header (magic u32, version u16, header size u16, payload size u64).
///
/// # Safety
/// `p` points to a fatbin header.
unsafe fn fatbin_len(p: *const u8) -> usize {
    // SAFETY: forwarded contract.
    unsafe { read::<u16>(p, 6) as usize + read::<u64>(p, 8) as usize }
}

/// End of a 64-bit ELF file: the furthest of the program and section
/// header tables and the section contents.
///
/// # Safety
/// `p` points to a complete ELF image.
unsafe fn elf_len(p: *const u8) -> CuResult<usize> {
    // SAFETY: forwarded contract; offsets are those of the ELF64 header.
    unsafe {
        if read::<u8>(p, 4) != 2 {
            return Err(CuError::INVALID_IMAGE); // not ELFCLASS64
        }
        let phoff = read::<u64>(p, 0x20) as usize;
        let shoff = read::<u64>(p, 0x28) as usize;
        let phentsize = read::<u16>(p, 0x36) as usize;
        let phnum = read::<u16>(p, 0x38) as usize;
        let shentsize = read::<u16>(p, 0x3A) as usize;
        let shnum = read::<u16>(p, 0x3C) as usize;
        let mut end = (phoff + phentsize * phnum).max(shoff + shentsize * shnum).max(0x40);
        if shoff > MAX_IMAGE || shentsize < 0x40 {
            return Err(CuError::INVALID_IMAGE);
        }
        for i in 0..shnum {
            let sh = shoff + i * shentsize;
            let kind = read::<u32>(p, sh + 4);
            let offset = read::<u64>(p, sh + 0x18) as usize;
            let size = read::<u64>(p, sh + 0x20) as usize;
            // SHT_NOBITS occupies no bytes in the file.
            if kind != 8 {
                end = end.max(offset.saturating_add(size));
            }
        }
        Ok(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_text() {
        let ptx = b".version 8.0\n.target sm_90\n\0trailing";
        // SAFETY: a NUL-terminated buffer.
        let img = unsafe { image(ptx.as_ptr()) }.expect("ptx");
        assert_eq!(img.len(), 28);
    }

    /// A fatbin of `payload` bytes of zeros.
    fn fatbin_of(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 16 + payload];
        f[0..4].copy_from_slice(&FATBIN_MAGIC.to_le_bytes());
        f[4..6].copy_from_slice(&1u16.to_le_bytes());
        f[6..8].copy_from_slice(&16u16.to_le_bytes());
        f[8..16].copy_from_slice(&(payload as u64).to_le_bytes());
        f
    }

    /// A fatbin wrapper of `version` for `data` and the pointer array `list`.
    fn wrapper_of(version: u32, data: &[u8], list: *const *const u8) -> [u8; 24] {
        let mut w = [0u8; 24];
        w[0..4].copy_from_slice(&FATBIN_WRAPPER_MAGIC.to_le_bytes());
        w[4..8].copy_from_slice(&version.to_le_bytes());
        w[8..16].copy_from_slice(&(data.as_ptr() as usize).to_le_bytes());
        w[16..24].copy_from_slice(&(list as usize).to_le_bytes());
        w
    }

    #[test]
    fn prelinked_fatbins_of_an_rdc_program() {
        let linked = fatbin_of(32);
        let (a, b) = (fatbin_of(8), fatbin_of(40));
        let b_wrapped = wrapper_of(1, &b, std::ptr::null());
        let list = [a.as_ptr(), b_wrapped.as_ptr(), std::ptr::null()];
        let w = wrapper_of(2, &linked, list.as_ptr());
        // SAFETY: the wrapper, its array and the fatbins above are live.
        let pieces = unsafe { prelinked(w.as_ptr()) }.expect("prelinked");
        assert_eq!(pieces.iter().map(|p| p.len()).collect::<Vec<_>>(), [24, 56]);
        // SAFETY: as above.
        assert_eq!(unsafe { image(w.as_ptr()) }.expect("image").len(), 48);
        // Version 1, a null array, a bare fatbin: nothing prelinked.
        let v1 = wrapper_of(1, &linked, list.as_ptr());
        let none = wrapper_of(2, &linked, std::ptr::null());
        for p in [v1.as_ptr(), none.as_ptr(), linked.as_ptr()] {
            // SAFETY: as above.
            assert!(unsafe { prelinked(p) }.expect("prelinked").is_empty());
        }
        // An entry that is neither a fatbin nor a wrapper is refused.
        let junk = [0u8; 32];
        let bad = [junk.as_ptr(), std::ptr::null()];
        let w = wrapper_of(2, &linked, bad.as_ptr());
        // SAFETY: as above.
        assert_eq!(unsafe { prelinked(w.as_ptr()) }.err(), Some(CuError::INVALID_IMAGE));
    }

    #[test]
    fn fatbin_and_wrapper() {
        let mut fatbin = [0u8; 16 + 32];
        fatbin[0..4].copy_from_slice(&FATBIN_MAGIC.to_le_bytes());
        fatbin[4..6].copy_from_slice(&1u16.to_le_bytes());
        fatbin[6..8].copy_from_slice(&16u16.to_le_bytes());
        fatbin[8..16].copy_from_slice(&32u64.to_le_bytes());
        // SAFETY: a complete fatbin.
        assert_eq!(unsafe { image(fatbin.as_ptr()) }.expect("fatbin").len(), 48);
        let mut wrapper = [0u8; 24];
        wrapper[0..4].copy_from_slice(&FATBIN_WRAPPER_MAGIC.to_le_bytes());
        wrapper[4..8].copy_from_slice(&1u32.to_le_bytes());
        wrapper[8..16].copy_from_slice(&(fatbin.as_ptr() as usize).to_le_bytes());
        // SAFETY: a wrapper pointing at the fatbin above.
        let img = unsafe { image(wrapper.as_ptr()) }.expect("wrapper");
        assert_eq!((img.as_ptr(), img.len()), (fatbin.as_ptr(), 48));
    }

    #[test]
    fn elf_extent() {
        // A minimal ELF64 header with two section headers at 0x100 and one
        // section's bytes ending at 0x300.
        let mut elf = vec![0u8; 0x300];
        elf[0..4].copy_from_slice(&ELF_MAGIC);
        elf[4] = 2;
        elf[0x28..0x30].copy_from_slice(&0x100u64.to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&2u16.to_le_bytes());
        let sh1 = 0x140;
        elf[sh1 + 4..sh1 + 8].copy_from_slice(&1u32.to_le_bytes());
        elf[sh1 + 0x18..sh1 + 0x20].copy_from_slice(&0x200u64.to_le_bytes());
        elf[sh1 + 0x20..sh1 + 0x28].copy_from_slice(&0x100u64.to_le_bytes());
        // SAFETY: a complete image of 0x300 bytes.
        assert_eq!(unsafe { image(elf.as_ptr()) }.expect("elf").len(), 0x300);
    }
}
