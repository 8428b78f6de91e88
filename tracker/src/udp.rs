//! The tracker's datagram socket: batches of requests read with one `recvmmsg` and answered with
//! one `sendmmsg`, on a thread of its own.
//!
//! Why datagrams at all: a TCP announce costs the tracker a `recv`, a `send` and its share of an
//! `epoll_wait` and a task wake-up, about half of its CPU per announce at 100k live peers. A
//! datagram has no connection: one system call reads every announce waiting from every peer,
//! one answers them all (BEP 15 moved public trackers to UDP for the same reason). What may
//! come this way, and why a spoofed source gains nothing, is the server's business
//! ([`crate::server`]); this module only moves bytes, bounded.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::IpAddr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes of a request datagram read at most; a longer one is dropped unread (an announce is
/// a few hundred bytes).
pub const MAX_REQUEST: usize = 2048;

/// Bytes of a reply datagram at most: within one Ethernet frame (1500 bytes less the IPv6 and
/// UDP headers), so that no reply is ever fragmented.
pub const MAX_REPLY: usize = 1452;

/// Datagrams read (and answered) per system call at most.
const BATCH: usize = 64;

/// How often a thread blocked on the socket looks at its stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// The socket's receive buffer asked for: a burst of about two thousand announces waits there
/// instead of being dropped by the kernel (the default holds about a hundred).
const RECV_BUFFER: libc::c_int = 4 << 20;

/// Source addresses whose rate is tracked at most; past it, addresses silent for a second are
/// forgotten, and while it is still full a new address goes untracked (then only the server's
/// own checks bound it).
const MAX_SOURCES: usize = 65_536;

/// Datagrams taken per source address: `per_sec` on average, up to `burst` at once. Past that a
/// source's datagrams are dropped before they are parsed, for about 0.1 us each, so that one
/// flooding address cannot keep the socket's buffer full and the others' datagrams dropped.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct PerSource {
    rate: Rate,
    buckets: HashMap<IpAddr, Bucket>,
}

impl PerSource {
    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            self.buckets
                .retain(|_, b| now.duration_since(b.at) < Duration::from_secs(1));
            if self.buckets.len() >= MAX_SOURCES {
                return true;
            }
        }
        let Rate { per_sec, burst } = self.rate;
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * per_sec).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn grow_recv_buffer(fd: i32) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid socket, an int option of the right size. FORCE needs CAP_NET_ADMIN;
        // without it the plain option is capped by net.core.rmem_max.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&RECV_BUFFER).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and storage is larger.
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(s).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Serve `sock` until `stop` is set: each datagram of at most [`MAX_REQUEST`] bytes, from a
/// source within its `rate`, goes to `answer(source, bytes, reply)`, which returns whether to
/// send `reply` (cleared before) back to the source. Replies longer than [`MAX_REPLY`] are not
/// sent.
///
/// # Errors
/// A socket error other than a timeout or an interruption.
pub fn serve(
    sock: &UdpSocket,
    stop: &AtomicBool,
    rate: Rate,
    mut answer: impl FnMut(SocketAddr, &[u8], &mut Vec<u8>) -> bool,
) -> io::Result<()> {
    sock.set_read_timeout(Some(STOP_POLL))?;
    let fd = sock.as_raw_fd();
    grow_recv_buffer(fd);
    let mut sources = PerSource {
        rate,
        buckets: HashMap::new(),
    };
    let mut bufs = vec![[0u8; MAX_REQUEST]; BATCH];
    // SAFETY: sockaddr_storage is plain data; all zeros is a valid (unspecified) value.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; BATCH];
    let mut replies: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(MAX_REPLY)).collect();
    // Which request each reply answers.
    let mut to: Vec<usize> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .zip(names.iter_mut())
            .map(|(v, name)| {
                // SAFETY: mmsghdr is plain data; the pointers set below outlive the call.
                let mut m: libc::mmsghdr = unsafe { zeroed() };
                m.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                m.msg_hdr.msg_iov = std::ptr::from_mut(v);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` holds BATCH headers whose buffers and names live until the call
        // returns; MSG_WAITFORONE blocks (up to the read timeout) for the first only.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier reply, reported on the socket: not ours to fix.
                io::ErrorKind::ConnectionRefused => continue,
                _ => return Err(e),
            }
        }
        to.clear();
        let now = Instant::now();
        for (i, m) in msgs.iter().enumerate().take(n as usize) {
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                continue; // Longer than any request: dropped.
            }
            let Some(src) = socket_addr(&names[i]) else {
                continue;
            };
            if !sources.allow(src.ip(), now) {
                crate::metrics::tracker().datagrams_dropped.inc();
                continue;
            }
            let reply = &mut replies[to.len()];
            reply.clear();
            if answer(src, &bufs[i][..m.msg_len as usize], reply) && reply.len() <= MAX_REPLY {
                to.push(i);
            }
        }
        drop(msgs);
        send_all(fd, &to, &mut names, &replies);
    }
    Ok(())
}

/// Send `replies[k]` to `names[to[k]]` for every k, with as few `sendmmsg` calls as the kernel
/// allows; a reply the kernel refuses is dropped (its sender asks again or uses TCP).
fn send_all(fd: i32, to: &[usize], names: &mut [libc::sockaddr_storage], replies: &[Vec<u8>]) {
    let mut iov: Vec<libc::iovec> = replies[..to.len()]
        .iter()
        .map(|r| libc::iovec {
            iov_base: r.as_ptr().cast_mut().cast(),
            iov_len: r.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .zip(to)
        .map(|(v, &i)| {
            let name = &mut names[i];
            let len = if i32::from(name.ss_family) == libc::AF_INET6 {
                size_of::<libc::sockaddr_in6>()
            } else {
                size_of::<libc::sockaddr_in>()
            };
            // SAFETY: plain data, pointers valid until the calls below return.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            m.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
            m.msg_hdr.msg_namelen = len as libc::socklen_t;
            m.msg_hdr.msg_iov = std::ptr::from_mut(v);
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut done = 0;
    while done < msgs.len() {
        let rest = &mut msgs[done..];
        // SAFETY: `rest` holds valid headers (see above).
        // Never blocks: a reply that finds no room is dropped (its sender asks again or uses
        // TCP), and the others are not held behind it.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent <= 0 {
            // The first of the rest failed: skip it and go on with the others.
            done += 1;
        } else {
            done += sent as usize;
        }
    }
}
