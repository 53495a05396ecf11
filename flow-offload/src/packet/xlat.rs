//! RFC 7915 IPv6↔IPv4 header translation (in progress).

use core::net::{Ipv4Addr, Ipv6Addr};

use super::Error;

/// Ports written by the translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4Rewrite {
    /// Source port (ICMP echo: the identifier).
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// Why translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XlatError {
    /// Truncated.
    #[error("truncated")]
    Truncated,
    /// Output too small.
    #[error("output too small: need {need} bytes")]
    OutputTooSmall {
        /// Bytes needed.
        need: usize,
    },
    /// Packet.
    #[error(transparent)]
    Packet(#[from] Error),
}

/// IPv6 → IPv4.
pub fn ipv6_to_ipv4(
    _input: &[u8],
    _out: &mut [u8],
    _src: Ipv4Addr,
    _dst: Ipv4Addr,
    _l4: Option<L4Rewrite>,
) -> Result<usize, XlatError> {
    Err(XlatError::Truncated)
}

/// IPv4 → IPv6.
pub fn ipv4_to_ipv6(
    _input: &[u8],
    _out: &mut [u8],
    _src: Ipv6Addr,
    _dst: Ipv6Addr,
    _l4: Option<L4Rewrite>,
) -> Result<usize, XlatError> {
    Err(XlatError::Truncated)
}
