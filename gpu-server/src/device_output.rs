//! Device output of a worker process: `printf` and assert messages.
//!
//! The CUDA driver writes the output of device `printf` to the process's
//! stdout (fd 1) when the host synchronizes, and a failed device `assert`'s
//! message to its stderr (fd 2). In a worker process fd 1 is the
//! supervisor's protocol pipe, so [`install`] (called before the device
//! opens) moves the protocol to a duplicate of fd 1 and puts a pipe on fd 1;
//! [`install_stderr`] moves the worker's own logging to a duplicate of fd 2
//! ([`LogWriter`]) and puts a second pipe on fd 2.
//! A reader thread drains that pipe continuously into a bounded buffer, so
//! the driver never blocks on a full pipe; past the bound, output is dropped
//! and a one-line marker with the count takes its place. After each batch
//! the session thread calls [`Capture::collect`], which flushes C stdio and
//! hands the bytes collected so far to the batch's reply (bounded per reply;
//! the rest follows in later replies). The client writes them to the
//! application's stdout (stderr for what the driver wrote there) when its
//! synchronizing call returns.
//!
//! With in-process isolation nothing is installed: sessions share the
//! process, so output cannot be attributed to one, and it stays on the
//! server's stdout.
//!
//! This module is an FFI fence (file descriptors, C stdio): `unsafe` is
//! allowed here, each block with a `SAFETY` comment.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock, PoisonError};

/// Bytes of device output a worker holds for its client before it drops.
pub const BUFFER_BYTES: usize = 8 << 20;

static CAPTURE: OnceLock<Capture> = OnceLock::new();
static ERR_CAPTURE: OnceLock<Capture> = OnceLock::new();
/// Where this process's logs go once fd 2 is the capture pipe: a duplicate
/// of the original stderr.
static LOG_OUT: OnceLock<File> = OnceLock::new();

/// The capture of this process's stdout, when [`install`] ran.
pub fn installed() -> Option<&'static Capture> {
    CAPTURE.get()
}

/// The capture of this process's stderr, when [`install_stderr`] ran.
pub fn installed_stderr() -> Option<&'static Capture> {
    ERR_CAPTURE.get()
}

/// The log writer of the process (`tracing`'s, the panic hook's): the
/// original stderr, also after [`install_stderr`] put the capture pipe on
/// fd 2, so that the worker's own logs reach the supervisor's stderr and
/// never the client.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match LOG_OUT.get() {
            Some(mut f) => f.write(buf),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match LOG_OUT.get() {
            Some(mut f) => f.flush(),
            None => io::stderr().flush(),
        }
    }
}

/// Moves stdout: returns the protocol's writer (a duplicate of fd 1, close
/// on exec) and leaves a pipe on fd 1 whose bytes a reader thread collects.
/// Call once, before anything (the device driver) writes to stdout.
pub fn install() -> io::Result<File> {
    let proto = duplicate(1)?;
    capture_fd(1, &CAPTURE, "printf")?;
    Ok(proto)
}

/// Moves stderr: this process's logs ([`LogWriter`], and panics) go to a
/// duplicate of fd 2 from now on, and fd 2 becomes a pipe whose bytes (what
/// the driver writes there: device assert messages) a reader thread
/// collects. Call once, after [`install`] and before the device opens.
pub fn install_stderr() -> io::Result<()> {
    let log = duplicate(2)?;
    let _ = LOG_OUT.set(log);
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let _ = writeln!(LogWriter, "thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
    }));
    capture_fd(2, &ERR_CAPTURE, "assert").map(drop)
}

/// A close-on-exec duplicate of `fd`, numbered 3 or above.
fn duplicate(fd: RawFd) -> io::Result<File> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let dup = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `dup` is a fresh descriptor this function owns.
    Ok(unsafe { File::from_raw_fd(dup) })
}

/// Puts a pipe on `fd` (1 or 2) whose bytes a reader thread drains into
/// `cell`'s capture; `what` names the output in the marker of dropped bytes.
fn capture_fd(fd: RawFd, cell: &'static OnceLock<Capture>, what: &'static str) -> io::Result<&'static Capture> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both descriptors are fresh and ours.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    set_nonblocking(read.as_raw_fd())?;
    // Anything buffered for the old descriptor goes there first.
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
    // SAFETY: fflush(NULL) flushes every C output stream.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    // SAFETY: both descriptors are open; dup2 atomically replaces `fd`.
    cvt(unsafe { libc::dup2(write.as_raw_fd(), fd) })?;
    drop(write);
    let capture = cell.get_or_init(|| Capture { read, buffer: Mutex::new(Buffer::new(BUFFER_BYTES, what)) });
    std::thread::Builder::new().name(format!("gpupool-device-{what}")).spawn(move || capture.drain_forever())?;
    Ok(capture)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Writes `bytes` to fd 1 as the driver does (the emulated device's device
/// printf): into the capture pipe in a worker, to the server's stdout
/// otherwise. Errors (a closed stdout) are ignored, as the driver ignores them.
pub fn write_stdout(bytes: &[u8]) {
    // Through C stdio, as the driver's own output, so one fflush orders both.
    // SAFETY: glibc's `stdout` is a valid FILE*; fwrite reads `bytes.len()`
    // bytes from a live slice.
    unsafe { libc::fwrite(bytes.as_ptr().cast(), 1, bytes.len(), stdout_file()) };
}

/// Writes `bytes` to fd 2 as the driver does with a device assert's
/// message (the emulated device's): into the capture pipe in a worker, to
/// the server's stderr otherwise. Errors are ignored, as the driver's are.
pub fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writes from a live slice to a file descriptor.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        match n {
            n if n > 0 => rest = &rest[n as usize..],
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

unsafe extern "C" {
    /// The C library's `stdout` stream.
    #[link_name = "stdout"]
    static C_STDOUT: *mut libc::FILE;
}

fn stdout_file() -> *mut libc::FILE {
    // SAFETY: a read of the C library's initialized global.
    unsafe { C_STDOUT }
}

/// The capture pipe's read end and what has been read from it.
#[derive(Debug)]
pub struct Capture {
    read: OwnedFd,
    buffer: Mutex<Buffer>,
}

impl Capture {
    fn drain_forever(&self) {
        let mut poll = libc::pollfd { fd: self.read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut poll, 1, -1) };
            if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            // Read under the lock so that bytes enter the buffer in pipe
            // order whichever thread reads them.
            self.lock().fill_from(self.read.as_raw_fd());
            if poll.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 && poll.revents & libc::POLLIN == 0
            {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Flushes C stdio, reads what the pipe holds and returns up to `max`
    /// bytes of the output collected so far, oldest first.
    pub fn collect(&self, max: usize) -> Vec<u8> {
        // SAFETY: fflush(NULL) flushes every C output stream.
        unsafe { libc::fflush(std::ptr::null_mut()) };
        let mut b = self.lock();
        b.fill_from(self.read.as_raw_fd());
        b.take(max)
    }
}

/// Collected output, bounded: past `capacity` bytes are counted and
/// dropped, and a marker line takes their place in the stream.
#[derive(Debug)]
struct Buffer {
    bytes: std::collections::VecDeque<u8>,
    capacity: usize,
    /// Bytes dropped since the last marker.
    dropped: u64,
    /// What the output is, for the marker ("printf", "assert").
    what: &'static str,
}

impl Buffer {
    fn new(capacity: usize, what: &'static str) -> Self {
        Self { bytes: Default::default(), capacity, dropped: 0, what }
    }

    /// Reads the non-blocking descriptor `fd` until it is empty.
    fn fill_from(&mut self, fd: RawFd) {
        // Not zeroed: this runs after every batch, and usually reads nothing.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 64 << 10];
        loop {
            // SAFETY: `chunk` is a live buffer of the length passed.
            let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            match n {
                n if n > 0 => {
                    // SAFETY: read(2) initialized the first `n` bytes.
                    let read = unsafe { std::slice::from_raw_parts(chunk.as_ptr().cast::<u8>(), n as usize) };
                    self.push(read);
                }
                0 => return,
                _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                _ => return,
            }
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.capacity.saturating_sub(self.bytes.len());
        // Room again after a loss: the marker goes where the gap is, and
        // does not take the room of the data.
        let marker = if self.dropped > 0 && room > 0 { self.mark() } else { 0 };
        let room = (self.capacity + marker).saturating_sub(self.bytes.len());
        let kept = data.len().min(room);
        self.bytes.extend(&data[..kept]);
        self.dropped += (data.len() - kept) as u64;
    }

    /// Appends the marker for the bytes dropped so far (it may pass the
    /// capacity by its own length, once per gap); returns that length.
    fn mark(&mut self) -> usize {
        let newline = if self.bytes.back().is_some_and(|&b| b != b'\n') { "\n" } else { "" };
        let line = format!(
            "{newline}[gpupool] {} bytes of device {} output dropped: the worker's buffer of {} bytes was full\n",
            self.dropped, self.what, self.capacity
        );
        self.bytes.extend(line.as_bytes());
        self.dropped = 0;
        line.len()
    }

    fn take(&mut self, max: usize) -> Vec<u8> {
        if self.dropped > 0 && self.bytes.len() < max {
            self.mark();
        }
        let n = self.bytes.len().min(max);
        self.bytes.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_keeps_order_and_bounds_each_take() {
        let mut b = Buffer::new(100, "printf");
        b.push(b"one\n");
        b.push(b"two\n");
        assert_eq!(b.take(5), b"one\nt");
        assert_eq!(b.take(100), b"wo\n");
        assert!(b.take(100).is_empty());
    }

    #[test]
    fn overflow_is_dropped_with_one_marker_at_the_gap() {
        let mut b = Buffer::new(10, "printf");
        b.push(b"0123456789abc");
        b.push(b"def");
        assert_eq!(b.dropped, 6);
        // The first take makes room; the marker follows the kept bytes.
        assert_eq!(b.take(4), b"0123");
        b.push(b"ok\n");
        let rest = String::from_utf8(b.take(1000)).expect("utf8");
        assert!(rest.starts_with("456789\n[gpupool] 6 bytes of device printf output dropped"), "{rest}");
        assert!(rest.ends_with("was full\nok\n"), "{rest}");
        assert_eq!(b.dropped, 0);
    }

    #[test]
    fn marker_comes_when_the_buffer_empties() {
        let mut b = Buffer::new(4, "printf");
        b.push(b"abcdefg\n");
        let all = String::from_utf8(b.take(1000)).expect("utf8");
        assert!(all.starts_with("abcd\n[gpupool] 4 bytes"), "{all}");
        assert!(b.take(1000).is_empty());
    }
}
