//! ICMPv6 (RFC 4443).

use core::net::Ipv6Addr;

use super::checksum;
use super::{
    clamp, clamp_mut, get_u16, get_u32, get_u8, ip_proto, malformed, set_u16, set_u32, set_u8,
    truncated, Header, Result,
};

/// Destination unreachable.
pub const DST_UNREACHABLE: u8 = 1;
/// Packet too big.
pub const PKT_TOO_BIG: u8 = 2;
/// Time exceeded.
pub const TIME_EXCEEDED: u8 = 3;
/// Parameter problem.
pub const PARAM_PROBLEM: u8 = 4;
/// Echo request.
pub const ECHO_REQUEST: u8 = 128;
/// Echo reply.
pub const ECHO_REPLY: u8 = 129;

/// Destination-unreachable codes.
pub mod unreachable {
    /// No route to destination.
    pub const NO_ROUTE: u8 = 0;
    /// Communication with destination administratively prohibited.
    pub const ADMIN_PROHIBITED: u8 = 1;
    /// Beyond scope of source address.
    pub const BEYOND_SCOPE: u8 = 2;
    /// Address unreachable.
    pub const ADDRESS: u8 = 3;
    /// Port unreachable.
    pub const PORT: u8 = 4;
}

/// Parameter-problem codes.
pub mod param_problem {
    /// Erroneous header field encountered.
    pub const HEADER_FIELD: u8 = 0;
    /// Unrecognized next header type encountered.
    pub const NEXT_HEADER: u8 = 1;
    /// Unrecognized IPv6 option encountered.
    pub const OPTION: u8 = 2;
}

/// A view of an ICMPv6 message: type, code, checksum, 4 bytes of message body (echo
/// identifier and sequence, MTU, pointer), payload. The checksum covers the IPv6
/// pseudo-header and the whole buffer (pass the IPv6 payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icmpv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    pub const REST: usize = 4;
    pub const IDENT: usize = 4;
    pub const SEQ: usize = 6;
    pub const END: usize = 8;
}

impl<T: AsRef<[u8]>> Icmpv6Packet<T> {
    /// Length of the header (type to the first 4 bytes of body).
    pub const HEADER_LEN: usize = field::END;

    /// A view without any check.
    pub fn new_unchecked(buffer: T) -> Self {
        Icmpv6Packet { buffer }
    }

    /// A view, if the buffer holds the 8-byte header.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer holds the 8-byte header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < field::END {
            Err(truncated(Header::Icmpv6))
        } else {
            Ok(())
        }
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Message type.
    pub fn msg_type(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::TYPE)
    }

    /// Message code.
    pub fn code(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::CODE)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Bytes 4..8 as one word.
    pub fn rest_of_header(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::REST)
    }

    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::IDENT)
    }

    /// Echo sequence number.
    pub fn echo_seq_no(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SEQ)
    }

    /// MTU of a packet-too-big message (bytes 4..8).
    pub fn mtu(&self) -> u32 {
        self.rest_of_header()
    }

    /// Pointer of a parameter-problem message (bytes 4..8).
    pub fn pointer(&self) -> u32 {
        self.rest_of_header()
    }

    /// Whether the checksum over the pseudo-header and the whole buffer is correct.
    pub fn verify_checksum(&self, src: Ipv6Addr, dst: Ipv6Addr) -> bool {
        let d = self.buffer.as_ref();
        let ph = checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, d.len() as u32);
        checksum::fold(ph + checksum::sum(d)) == 0xFFFF
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Icmpv6Packet<&'a T> {
    /// Everything after the 8-byte header.
    pub fn payload(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), field::END, usize::MAX)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv6Packet<T> {
    /// Sets the message type.
    pub fn set_msg_type(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::TYPE, v);
    }

    /// Sets the message code.
    pub fn set_code(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::CODE, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }

    /// Sets bytes 4..8.
    pub fn set_rest_of_header(&mut self, v: u32) {
        set_u32(self.buffer.as_mut(), field::REST, v);
    }

    /// Sets the echo identifier.
    pub fn set_echo_ident(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::IDENT, v);
    }

    /// Sets the echo sequence number.
    pub fn set_echo_seq_no(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::SEQ, v);
    }

    /// Sets the packet-too-big MTU.
    pub fn set_mtu(&mut self, v: u32) {
        self.set_rest_of_header(v);
    }

    /// Sets the parameter-problem pointer.
    pub fn set_pointer(&mut self, v: u32) {
        self.set_rest_of_header(v);
    }

    /// Computes and writes the checksum over the pseudo-header and the whole buffer.
    pub fn fill_checksum(&mut self, src: Ipv6Addr, dst: Ipv6Addr) {
        self.set_checksum(0);
        let d = self.buffer.as_ref();
        let ph = checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, d.len() as u32);
        let c = checksum::finish(ph + checksum::sum(d));
        self.set_checksum(c);
    }

    /// Everything after the 8-byte header, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        clamp_mut(self.buffer.as_mut(), field::END, usize::MAX)
    }
}

/// An ICMPv6 echo message (the data is the view's payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv6Repr {
    /// Echo request (type 128).
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
    },
    /// Echo reply (type 129).
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
    },
}

impl Icmpv6Repr {
    /// Length of the header [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = field::END;

    /// Decodes an echo request or reply with code 0; any other message is `Malformed`. The
    /// checksum is not verified.
    pub fn parse<T: AsRef<[u8]>>(p: &Icmpv6Packet<T>) -> Result<Self> {
        p.check_len()?;
        let (ident, seq_no) = (p.echo_ident(), p.echo_seq_no());
        match (p.msg_type(), p.code()) {
            (ECHO_REQUEST, 0) => Ok(Icmpv6Repr::EchoRequest { ident, seq_no }),
            (ECHO_REPLY, 0) => Ok(Icmpv6Repr::EchoReply { ident, seq_no }),
            _ => Err(malformed(Header::Icmpv6)),
        }
    }

    /// Writes the 8-byte header with a zero checksum. Write the data, then call
    /// [`Icmpv6Packet::fill_checksum`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Icmpv6Packet<T>) {
        let (ty, ident, seq_no) = match *self {
            Icmpv6Repr::EchoRequest { ident, seq_no } => (ECHO_REQUEST, ident, seq_no),
            Icmpv6Repr::EchoReply { ident, seq_no } => (ECHO_REPLY, ident, seq_no),
        };
        p.set_msg_type(ty);
        p.set_code(0);
        p.set_checksum(0);
        p.set_echo_ident(ident);
        p.set_echo_seq_no(seq_no);
    }
}
