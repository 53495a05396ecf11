//! A small synchronous rtnetlink client (links only) and network-namespace helpers.
//!
//! Synchronous on purpose: a netlink socket belongs to the namespace of the thread that opens
//! it, so the manager enters a namespace on a thread of its own, opens the socket there, does
//! its work and leaves; no async runtime has to follow it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use nix::sched::CloneFlags;
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// A netlink or namespace operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The errno.
        source: nix::Error,
    },
    /// The kernel refused a request.
    #[error("{what}: kernel refused: {errno}")]
    Refused {
        /// What was being done.
        what: String,
        /// The errno the kernel answered.
        errno: nix::errno::Errno,
    },
    /// The kernel's answer did not parse.
    #[error("{what}: unparsable answer: {detail}")]
    Parse {
        /// What was being done.
        what: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// A namespace file could not be used.
    #[error("namespace {path}: {source}")]
    Namespace {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The worker thread died.
    #[error("namespace worker thread panicked")]
    Thread,
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> RtnlError {
    move |source| RtnlError::Sys { what, source }
}

/// A route netlink socket in the namespace of the thread that opened it.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// Opens a socket (5 s receive timeout: a kernel that never answers is an error).
    pub fn open() -> Result<Rtnl, RtnlError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(sys("netlink socket"))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(sys("netlink bind"))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &libc_timeval(Duration::from_secs(5)),
        )
        .map_err(sys("netlink timeout"))?;
        Ok(Rtnl {
            fd,
            seq: 0,
            buf: vec![0; 1 << 16],
        })
    }

    fn send_msg(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<u32, RtnlError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        m.finalize();
        let mut out = vec![0u8; m.buffer_len()];
        m.serialize(&mut out);
        send(self.fd.as_raw_fd(), &out, MsgFlags::empty()).map_err(sys("netlink send"))?;
        Ok(self.seq)
    }

    /// Receives the answers to request `seq` until its end (ACK, error or NLMSG_DONE).
    fn answers(
        &mut self,
        seq: u32,
        what: &str,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), RtnlError> {
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty())
                .map_err(sys("netlink receive"))?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| RtnlError::Parse {
                        what: "netlink answer",
                        detail: e.to_string(),
                    })?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(RtnlError::Parse {
                        what: "netlink answer",
                        detail: "zero-length message".to_owned(),
                    });
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(RtnlError::Refused {
                                what: what.to_owned(),
                                errno: nix::errno::Errno::from_raw(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    _ => {}
                }
            }
        }
    }

    /// Every link of this namespace.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>, RtnlError> {
        let seq = self.send_msg(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        self.answers(seq, "link dump", |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                out.push(l);
            }
        })?;
        Ok(out)
    }

    /// Creates a link (it must not exist).
    pub fn create_link(&mut self, what: &str, link: LinkMessage) -> Result<(), RtnlError> {
        let seq = self.send_msg(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        self.answers(seq, what, |_| {})
    }

    /// Changes an existing link (its header names it by index).
    pub fn set_link(&mut self, what: &str, link: LinkMessage) -> Result<(), RtnlError> {
        let seq = self.send_msg(
            RouteNetlinkMessage::SetLink(link),
            NLM_F_REQUEST | NLM_F_ACK,
        )?;
        self.answers(seq, what, |_| {})
    }

    /// Deletes a link by index.
    pub fn delete_link(&mut self, what: &str, index: u32) -> Result<(), RtnlError> {
        let mut l = LinkMessage::default();
        l.header.index = index;
        let seq = self.send_msg(RouteNetlinkMessage::DelLink(l), NLM_F_REQUEST | NLM_F_ACK)?;
        self.answers(seq, what, |_| {})
    }
}

fn libc_timeval(d: Duration) -> TimeVal {
    TimeVal::new(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        i64::from(d.subsec_micros()),
    )
}

/// Runs `f` on a thread that has entered the network namespace bound at `path`.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, RtnlError> + Send + 'static,
) -> Result<T, RtnlError> {
    let file = std::fs::File::open(path).map_err(|source| RtnlError::Namespace {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(sys("setns"))?;
        f()
    })
    .join()
    .map_err(|_| RtnlError::Thread)?
}

/// Creates a network namespace and binds it at `path` (as `ip netns add` does), with its
/// loopback up.
pub fn create_netns(path: &Path) -> Result<(), RtnlError> {
    let ns_err = |source| RtnlError::Namespace {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(ns_err)?;
    let target = path.to_path_buf();
    let made = std::thread::spawn(move || -> Result<(), RtnlError> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare"))?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind-mount the namespace"))?;
        let mut nl = Rtnl::open()?;
        let lo = nl
            .links()?
            .into_iter()
            .find(|l| super::link_name(l) == Some("lo"))
            .map(|l| l.header.index);
        if let Some(index) = lo {
            nl.set_link("loopback up", super::up_request(index))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| RtnlError::Thread)?;
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

/// Unbinds and removes the namespace bound at `path` (it dies with its last user).
pub fn delete_netns(path: &Path) -> Result<(), RtnlError> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(sys("unmount"))?;
    std::fs::remove_file(path).map_err(|source| RtnlError::Namespace {
        path: path.to_path_buf(),
        source,
    })
}

/// An open handle on a namespace, to move links into it (`IFLA_NET_NS_FD`).
pub fn open_netns(path: &Path) -> Result<OwnedFd, RtnlError> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(|source| RtnlError::Namespace {
            path: path.to_path_buf(),
            source,
        })
}
