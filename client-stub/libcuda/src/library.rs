//! Libraries load lazily. The CUDA runtime registers every fatbin of every
//! library in the process with `cuLibraryLoadData` at startup (445 of them
//! under PyTorch) and uses a few; a load that waited for the server each
//! time cost seconds. So `cuLibraryLoadData` checks the image here, keeps
//! it, takes a module id as the handle and returns; the module is loaded on
//! the server when the library is first used (a kernel looked up, its
//! module, a variable, the kernel list), once, by whichever thread gets
//! there first.
//!
//! An image the CUDA runtime registered lies in a read-only segment of a
//! loaded object (nvcc puts fatbins in `.nv_fatbin`) and is kept by
//! address instead of copied; any other image is copied.

use crate::abi::CuResult;
use std::ffi::c_void;
use std::sync::Mutex;

/// The bytes of a library not loaded yet.
#[derive(Debug)]
pub(crate) enum Image {
    /// Read-only data of a loaded object (see [`Image::of`]).
    Mapped(&'static [u8]),
    /// A copy.
    Owned(Box<[u8]>),
}

impl Image {
    /// Keeps `bytes` by address when they lie in a read-only segment of an
    /// object the dynamic loader has mapped, else copies them.
    ///
    /// Read-only: nothing the application does short of `mprotect` changes
    /// them before first use. Kept by address: the object stays mapped as
    /// long as the library is used. The CUDA runtime loads the fatbins of
    /// an object from the object's constructors and unloads them from its
    /// destructors (`__cudaUnregisterFatBinary`), before `dlclose` unmaps
    /// it; a program that unloads an object and then uses a library made
    /// from its data breaks CUDA's own rule for the image pointer.
    pub(crate) fn of(bytes: &[u8]) -> Image {
        if in_read_only_segment(bytes.as_ptr() as usize, bytes.len()) {
            // SAFETY: the range lies in a read-only segment of a loaded
            // object, which stays mapped and unchanged while the library
            // can be used (above).
            Image::Mapped(unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) })
        } else {
            Image::Owned(bytes.into())
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Image::Mapped(b) => b,
            Image::Owned(b) => b,
        }
    }
}

/// What a library is loaded from.
#[derive(Debug)]
pub(crate) struct Images {
    pub(crate) image: Image,
    /// The relocatable fatbins of a `-rdc` program's linked image
    /// ([`crate::image::prelinked`]): linked instead when the image has no
    /// code for the GPU.
    pub(crate) prelinked: Vec<Image>,
}

/// A library: its images until the first use loads it.
#[derive(Debug)]
pub(crate) struct Library {
    /// `Some` while not loaded. Held during the load, so a second thread
    /// using the library meanwhile waits for the first one's load.
    pending: Mutex<Option<Images>>,
}

impl Library {
    pub(crate) fn new(images: Images) -> Self {
        Self { pending: Mutex::new(Some(images)) }
    }

    /// Loads the library with `load` unless done already. A failed load
    /// keeps the images: the next use tries again.
    pub(crate) fn ensure_loaded(&self, load: impl FnOnce(&Images) -> CuResult) -> CuResult {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(images) = pending.as_ref() {
            load(images)?;
            *pending = None;
        }
        Ok(())
    }

    /// `true` once loaded; waits for a load in progress.
    pub(crate) fn is_loaded(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_none()
    }
}

/// `true` when `[addr, addr + len)` lies inside one loadable, non-writable
/// segment of an object the dynamic loader has mapped (the program or a
/// shared library).
fn in_read_only_segment(addr: usize, len: usize) -> bool {
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut range = (addr, end, false);
    // SAFETY: the callback only reads the loader's program headers for the
    // duration of the call and writes through `data`, which points to
    // `range` for that duration.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut range).cast()) };
    range.2
}

/// `dl_iterate_phdr`'s callback: marks `data` (start, end, found) found
/// when a read-only `PT_LOAD` segment of `info` holds the range; returns
/// non-zero to stop the walk then.
unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> libc::c_int {
    // SAFETY: the loader passes a valid `info` whose `dlpi_phdr` holds
    // `dlpi_phnum` headers; `data` is the `range` of the caller.
    unsafe {
        let range = &mut *data.cast::<(usize, usize, bool)>();
        let info = &*info;
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        let headers = std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum));
        for h in headers {
            if h.p_type != libc::PT_LOAD || h.p_flags & libc::PF_W != 0 {
                continue;
            }
            let start = (info.dlpi_addr as usize).wrapping_add(h.p_vaddr as usize);
            let Some(end) = start.checked_add(h.p_memsz as usize) else {
                continue;
            };
            if start <= range.0 && range.1 <= end {
                range.2 = true;
                return 1;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::CuError;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Barrier};

    static READ_ONLY: [u8; 64] = [7; 64];

    #[test]
    fn static_data_is_kept_by_address_and_heap_data_copied() {
        let img = Image::of(&READ_ONLY);
        assert!(matches!(img, Image::Mapped(b) if b.as_ptr() == READ_ONLY.as_ptr()), "{img:?}");
        let heap = vec![1u8; 64];
        let img = Image::of(&heap);
        assert!(matches!(&img, Image::Owned(b) if b.as_ptr() != heap.as_ptr()), "{img:?}");
        assert_eq!(img.bytes(), &heap[..]);
        let mut writable = [0u8; 16];
        writable[0] = 1;
        assert!(matches!(Image::of(&writable), Image::Owned(_)));
        assert!(!in_read_only_segment(usize::MAX - 4, 16), "overflow is no match");
    }

    #[test]
    fn loads_once_retries_after_a_failure() {
        let lib = Library::new(Images { image: Image::of(b"image\0"), prelinked: Vec::new() });
        assert!(!lib.is_loaded());
        assert_eq!(lib.ensure_loaded(|_| Err(CuError::INVALID_IMAGE)), Err(CuError::INVALID_IMAGE));
        assert!(!lib.is_loaded(), "a failed load keeps the image");
        let mut seen = Vec::new();
        lib.ensure_loaded(|b| {
            seen = b.image.bytes().to_vec();
            Ok(())
        })
        .expect("load");
        assert_eq!(seen, b"image\0");
        assert!(lib.is_loaded());
        lib.ensure_loaded(|_| panic!("loaded twice")).expect("loaded already");
    }

    #[test]
    fn concurrent_first_uses_load_once() {
        let lib = Arc::new(Library::new(Images { image: Image::of(&READ_ONLY), prelinked: Vec::new() }));
        let loads = Arc::new(AtomicU32::new(0));
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lib, loads, start) = (lib.clone(), loads.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    lib.ensure_loaded(|_| {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("load");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }
}
