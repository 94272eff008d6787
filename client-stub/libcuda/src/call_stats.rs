//! The call table (`GPUPOOL_CALL_STATS=1`): per CUDA entry point, how many
//! calls were answered locally, how many were queued for the server and how
//! many waited for it, and the time the calling thread spent inside them
//! (µs in all, and `wait_us` of it blocked on the server: replies and bulk
//! bytes), printed to stderr at exit. Native CUDA waits only
//! where the program synchronizes; every other wait through gpupool is a
//! cost to remove, and this table finds them.
//!
//! Off by default: then [`measure`] is one load of a flag. On, each
//! outermost entry point compares the client core's per-thread counts
//! (`gpupool_client::stats`) before and after its body; entry points called
//! from inside another (the runtime's tables calling exports) count once,
//! as the outer one.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Row {
    local: u64,
    queued: u64,
    waited: u64,
    /// Time spent inside the entry point, in nanoseconds.
    nanos: u64,
    /// Of it, blocked on the server (replies, bulk bytes).
    wait_nanos: u64,
}

static TABLE: Mutex<Option<HashMap<&'static str, Row>>> = Mutex::new(None);

/// Counting stopped by [`gpupool_call_stats_pause`]: a benchmark times its
/// steps without the table's own cost (two clock reads and a lock per
/// call), then counts a second window.
static PAUSED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var("GPUPOOL_CALL_STATS").is_ok_and(|v| !v.is_empty() && v != "0");
        if on {
            // SAFETY: registers a function without captured state.
            unsafe { libc::atexit(print_at_exit) };
        }
        on
    })
}

/// Runs `body`, the body of entry point `name`, and counts what it did.
pub(crate) fn measure<T>(name: &'static str, body: impl FnOnce() -> T) -> T {
    if !enabled() || PAUSED.load(Ordering::Relaxed) {
        return body();
    }
    let outer = DEPTH.try_with(|d| d.replace(d.get() + 1) == 0).unwrap_or(false);
    let before = gpupool_client::stats::thread_counts();
    let start = std::time::Instant::now();
    let out = body();
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let _ = DEPTH.try_with(|d| d.set(d.get().saturating_sub(1)));
    if outer {
        let after = gpupool_client::stats::thread_counts();
        let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let row = table.get_or_insert_with(HashMap::new).entry(name).or_default();
        row.nanos = row.nanos.saturating_add(nanos);
        row.wait_nanos = row.wait_nanos.saturating_add(after.wait_nanos.saturating_sub(before.wait_nanos));
        if after.waited > before.waited {
            row.waited += 1;
        } else if after.queued > before.queued {
            row.queued += 1;
        } else {
            row.local += 1;
        }
    }
    out
}

/// The table as text, most waits first.
fn render(table: &HashMap<&'static str, Row>) -> String {
    let mut rows: Vec<_> = table.iter().collect();
    rows.sort_by(|a, b| b.1.waited.cmp(&a.1.waited).then(b.1.queued.cmp(&a.1.queued)).then(a.0.cmp(b.0)));
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max("entry point".len());
    let mut out = format!(
        "gpupool call table (GPUPOOL_CALL_STATS)\n{:<width$} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
        "entry point", "calls", "local", "queued", "waited", "us", "wait_us"
    );
    let mut total = Row::default();
    for (name, r) in rows {
        out += &format!(
            "{name:<width$} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
            r.local + r.queued + r.waited,
            r.local,
            r.queued,
            r.waited,
            r.nanos / 1000,
            r.wait_nanos / 1000
        );
        total.local += r.local;
        total.queued += r.queued;
        total.waited += r.waited;
        total.nanos += r.nanos;
        total.wait_nanos += r.wait_nanos;
    }
    out += &format!(
        "{:<width$} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}\n",
        "total",
        total.local + total.queued + total.waited,
        total.local,
        total.queued,
        total.waited,
        total.nanos / 1000,
        total.wait_nanos / 1000
    );
    out
}

/// `size_t gpupool_call_stats(char *buf, size_t len, int reset)`: the
/// call table so far as NUL-terminated text in `buf` (cut to `len - 1`
/// bytes), emptied afterwards when `reset` is non-zero. Returns the text's
/// full length, 0 when the table is off (`GPUPOOL_CALL_STATS` unset).
///
/// Benchmarks load it with `dlsym` to count the waits of a window of
/// steady-state work: reset after the warm-up, read after the steps. It is
/// not a CUDA entry point and does not start a session.
///
/// # Safety
/// `buf` is null or points to `len` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn gpupool_call_stats(buf: *mut std::ffi::c_char, len: usize, reset: std::ffi::c_int) -> usize {
    if !enabled() {
        return 0;
    }
    let text = take_text(reset != 0);
    // SAFETY: the caller's contract.
    unsafe { copy_c_string(&text, buf, len) };
    text.len()
}

/// `int gpupool_call_stats_pause(int paused)`: stops (non-zero) or
/// resumes (0) counting; returns whether it was paused before, or -1 when
/// the table is off. Calls made while paused are not in the table.
#[unsafe(no_mangle)]
pub extern "C" fn gpupool_call_stats_pause(paused: std::ffi::c_int) -> std::ffi::c_int {
    if !enabled() {
        return -1;
    }
    std::ffi::c_int::from(PAUSED.swap(paused != 0, Ordering::Relaxed))
}

/// The table as text; emptied afterwards when `reset`.
fn take_text(reset: bool) -> String {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let text = render(table.as_ref().unwrap_or(&HashMap::new()));
    if reset {
        *table = None;
    }
    text
}

/// Copies `text` into `buf` as a C string cut to `len - 1` bytes.
///
/// # Safety
/// `buf` is null or points to `len` writable bytes.
unsafe fn copy_c_string(text: &str, buf: *mut std::ffi::c_char, len: usize) {
    if buf.is_null() || len == 0 {
        return;
    }
    let n = text.len().min(len - 1);
    // SAFETY: `buf` has `len` writable bytes and `n < len`.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
        *buf.add(n) = 0;
    }
}

extern "C" fn print_at_exit() {
    let text = {
        let table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        render(table.as_ref().unwrap_or(&HashMap::new()))
    };
    // Straight to fd 2: at exit the Rust stderr handle may be gone.
    // SAFETY: writes a live buffer to a file descriptor.
    unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_puts_waits_first_and_totals() {
        let mut t = HashMap::new();
        t.insert("cuLaunchKernel", Row { local: 0, queued: 100, waited: 0, nanos: 500_000, wait_nanos: 0 });
        t.insert("cuStreamSynchronize", Row { local: 0, queued: 0, waited: 3, nanos: 300_000, wait_nanos: 250_000 });
        t.insert("cuDeviceGetAttribute", Row { local: 40, queued: 0, waited: 0, nanos: 4_000, wait_nanos: 0 });
        let text = render(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[2].starts_with("cuStreamSynchronize") && lines[2].ends_with(" 300          250"), "{text}");
        assert!(lines[3].starts_with("cuLaunchKernel"), "{text}");
        let total: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(total, ["total", "143", "40", "100", "3", "804", "250"], "{text}");
    }

    #[test]
    fn snapshot_reads_then_resets_and_cuts_to_the_buffer() {
        measure_row("cuCtxSynchronize", Row { local: 0, queued: 0, waited: 2, nanos: 0, wait_nanos: 0 });
        let text = take_text(false);
        assert!(text.lines().any(|l| l.starts_with("cuCtxSynchronize")), "{text}");
        assert!(take_text(true).contains("cuCtxSynchronize"));
        assert!(!take_text(false).contains("cuCtxSynchronize"), "reset empties the table");

        let mut buf = [0x55 as std::ffi::c_char; 8];
        // SAFETY: 8 writable bytes.
        unsafe { copy_c_string("gpupool call table", buf.as_mut_ptr(), buf.len()) };
        let got: Vec<u8> = buf.iter().map(|&c| c as u8).collect();
        assert_eq!(&got, b"gpupool\0");
        // SAFETY: a null buffer is ignored.
        unsafe { copy_c_string("x", std::ptr::null_mut(), 4) };
    }

    fn measure_row(name: &'static str, row: Row) {
        TABLE.lock().unwrap().get_or_insert_with(HashMap::new).insert(name, row);
    }
}
