//! The two system calls the emulator needs that std does not wrap: entering a network namespace
//! (for the calling thread only) and opening a TAP device.
//!
//! # Safety
//! Both calls pass a file descriptor we own and, for the ioctl, a pointer to a local struct
//! of the layout the kernel expects (`struct ifreq`, 40 bytes); neither keeps the pointer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('T', 202, int)` from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` reduced to the name and the flags; the union is padded to its full size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Move the calling thread (only it) into the named namespace of `ip netns`.
pub(crate) fn enter_netns(ns: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: `f` is an open namespace file for the duration of the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Create the TAP device `name` in the calling thread's namespace and return its queue: reads
/// give the Ethernet frames the kernel sends out of it, writes inject frames into it. The
/// device disappears when the returned file is closed.
pub(crate) fn open_tap(name: &str) -> io::Result<File> {
    if name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name",
        ));
    }
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking: a delay line drains its queue and polls only when it is empty.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a live, correctly sized `struct ifreq`; the kernel copies it in and out
    // during the call only.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// Wait until `f` is readable or `timeout_ms` passed; true when readable.
pub(crate) fn readable(f: &File, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    rc > 0 && p.revents & libc::POLLIN != 0
}

/// Whether this process runs as root (the emulator needs namespaces, TAP devices and tc).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// SIGKILL a process left in one of our namespaces (found by `ip netns pids`).
pub(crate) fn kill9(pid: i32) {
    if pid > 1 {
        // SAFETY: kill has no memory preconditions; the pid is a process in our namespace.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
