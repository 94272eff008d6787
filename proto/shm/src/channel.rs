//! The unix socket of a shared-memory session: the region's file descriptor
//! passed once with the [`crate::wire::Attach`] (`SCM_RIGHTS`), then fixed-size
//! requests and replies. Being able to connect to the server's socket and
//! pass it a memfd is what proves the client shares the server's host.

use crate::ShmError;
use crate::wire::MESSAGE_LEN;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Sends `message` with `fd` attached.
pub fn send_with_fd(stream: &UnixStream, message: &[u8; MESSAGE_LEN], fd: BorrowedFd<'_>) -> Result<(), ShmError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(ShmError::Io(std::io::Error::other("no room for the file descriptor")));
    }
    let sent = rustix::net::sendmsg(stream, &[IoSlice::new(message)], &mut control, rustix::net::SendFlags::empty())
        .map_err(std::io::Error::from)?;
    // The descriptor went with the first byte; the rest as usual.
    (&*stream).write_all(&message[sent..])?;
    Ok(())
}

/// Receives a message with one file descriptor attached. Descriptors beyond
/// the first are closed; a message without one is refused.
pub fn recv_with_fd(stream: &UnixStream) -> Result<([u8; MESSAGE_LEN], OwnedFd), ShmError> {
    let (message, fd) = recv_message(stream)?.ok_or_else(|| ShmError::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
    let fd = fd.ok_or_else(|| ShmError::Protocol("the attachment carries no file descriptor".into()))?;
    Ok((message, fd))
}

/// A request-sized message and the descriptor that came with it, if any.
pub type Received = ([u8; MESSAGE_LEN], Option<OwnedFd>);

/// Reads one request-sized message and the file descriptor that may come
/// with it (descriptors beyond the first are closed); `Ok(None)` on a clean
/// end before its first byte. Whether a descriptor belongs there is the
/// caller's to check.
pub fn recv_message(stream: &UnixStream) -> Result<Option<Received>, ShmError> {
    let mut message = [0u8; MESSAGE_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(stream, &mut [IoSliceMut::new(&mut message)], &mut control, RecvFlags::CMSG_CLOEXEC)
        {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(ShmError::Io(e.into())),
        }
    };
    if got.bytes == 0 {
        return Ok(None);
    }
    let mut fd = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for received in fds {
                fd.get_or_insert(received);
            }
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(ShmError::Protocol("more ancillary data than one file descriptor".into()));
    }
    let mut have = got.bytes;
    while have < MESSAGE_LEN {
        match (&*stream).read(&mut message[have..]) {
            Ok(0) => return Err(ShmError::Protocol(format!("message cut after {have} of {MESSAGE_LEN} bytes"))),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ShmError::Io(e)),
        }
    }
    Ok(Some((message, fd)))
}

/// Reads one fixed-size message; `Ok(None)` on a clean end before its first
/// byte.
pub fn read_message<const N: usize>(stream: &UnixStream) -> Result<Option<[u8; N]>, ShmError> {
    let mut b = [0u8; N];
    let mut have = 0;
    while have < N {
        match (&*stream).read(&mut b[have..]) {
            Ok(0) if have == 0 => return Ok(None),
            Ok(0) => return Err(ShmError::Protocol(format!("message cut after {have} of {N} bytes"))),
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ShmError::Io(e)),
        }
    }
    Ok(Some(b))
}

/// Writes one message.
pub fn write_message(stream: &UnixStream, message: &[u8]) -> Result<(), ShmError> {
    (&*stream).write_all(message).map_err(ShmError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;

    #[test]
    fn a_region_crosses_a_socket_pair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let region = Region::create("gpupool-test", 1 << 16).expect("region");
        region.write(0, b"shared").expect("write");
        send_with_fd(&a, &[7; MESSAGE_LEN], region.fd()).expect("sent");
        let (message, fd) = recv_with_fd(&b).expect("received");
        assert_eq!(message, [7; MESSAGE_LEN]);
        let other = Region::open(fd, 1 << 16).expect("mapped");
        let mut out = [0u8; 6];
        other.read(0, &mut out).expect("read");
        assert_eq!(&out, b"shared");
    }

    #[test]
    fn messages_come_with_or_without_a_descriptor() {
        let (a, b) = UnixStream::pair().expect("pair");
        let region = Region::create("gpupool-test", 1 << 16).expect("region");
        write_message(&a, &[1; MESSAGE_LEN]).expect("plain");
        send_with_fd(&a, &[2; MESSAGE_LEN], region.fd()).expect("with fd");
        let (m, fd) = recv_message(&b).expect("read").expect("a message");
        assert_eq!((m, fd.is_none()), ([1; MESSAGE_LEN], true));
        let (m, fd) = recv_message(&b).expect("read").expect("a message");
        assert_eq!(m, [2; MESSAGE_LEN]);
        Region::open(fd.expect("a descriptor"), 1 << 16).expect("mapped");
        drop(a);
        assert!(recv_message(&b).expect("clean end").is_none());
    }

    #[test]
    fn a_message_without_a_descriptor_is_refused() {
        let (a, b) = UnixStream::pair().expect("pair");
        write_message(&a, &[1; MESSAGE_LEN]).expect("sent");
        assert!(recv_with_fd(&b).unwrap_err().to_string().contains("no file descriptor"));
        drop(a);
        assert!(read_message::<4>(&b).expect("clean end").is_none());
    }
}
