//! UDP datagrams (RFC 768).

use super::checksum;
use super::{
    clamp, clamp_mut, get_u16, ip_proto, malformed, set_u16, truncated, Header, PseudoHeader,
    Result,
};

/// A view of a UDP datagram.
///
/// [`new_checked`](Self::new_checked) accepts a buffer holding the 8-byte header and the
/// length it declares (8 ≤ length ≤ buffer length). The datagram ends at the length field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
    pub const END: usize = 8;
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Length of the header.
    pub const HEADER_LEN: usize = field::END;

    /// A view without any check.
    pub fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }

    /// A view, if [`check_len`](Self::check_len) passes.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer: `Truncated` if shorter than 8 bytes or than the length field,
    /// `Malformed` if the length field is less than 8.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < field::END {
            return Err(truncated(Header::Udp));
        }
        let declared = usize::from(self.len());
        if declared < field::END {
            return Err(malformed(Header::Udp));
        }
        if declared > len {
            return Err(truncated(Header::Udp));
        }
        Ok(())
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length field (header and payload).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Checksum field (0: none, over IPv4).
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The checksum computed over the pseudo-header and the datagram, as it would be written
    /// (a computed 0 becomes 0xFFFF). Expects the checksum field to be zero, or gives the
    /// value that, added, makes the sum verify.
    fn compute<A: PseudoHeader>(&self, src: A, dst: A) -> u16 {
        let d = clamp(self.buffer.as_ref(), 0, usize::from(self.len()));
        let ph = A::pseudo_header_sum(src, dst, ip_proto::UDP, d.len() as u32);
        checksum::udp_nonzero(checksum::finish(ph + checksum::sum(d)))
    }

    /// Whether the checksum is correct for this pseudo-header. Over IPv4 a zero checksum
    /// ("none") passes; over IPv6 it fails (RFC 8200 §8.1).
    pub fn verify_checksum<A: PseudoHeader>(&self, src: A, dst: A) -> bool {
        if self.checksum() == 0 {
            return A::UDP_ZERO_MEANS_NONE;
        }
        let d = clamp(self.buffer.as_ref(), 0, usize::from(self.len()));
        let ph = A::pseudo_header_sum(src, dst, ip_proto::UDP, d.len() as u32);
        checksum::fold(ph + checksum::sum(d)) == 0xFFFF
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> UdpPacket<&'a T> {
    /// The datagram: header and payload up to the length field (clamped to the buffer).
    pub fn datagram(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), 0, usize::from(self.len()))
    }

    /// The payload: from byte 8 to the length field (clamped to the buffer).
    pub fn payload(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), field::END, usize::from(self.len()))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port.
    pub fn set_src_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::SRC_PORT, v);
    }

    /// Sets the destination port.
    pub fn set_dst_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::DST_PORT, v);
    }

    /// Sets the length field.
    pub fn set_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::LENGTH, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }

    /// Computes and writes the checksum over the pseudo-header and the datagram (up to the
    /// length field). A computed 0 is written as 0xFFFF.
    pub fn fill_checksum<A: PseudoHeader>(&mut self, src: A, dst: A) {
        self.set_checksum(0);
        let c = self.compute(src, dst);
        self.set_checksum(c);
    }

    /// The payload, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = usize::from(self.len());
        clamp_mut(self.buffer.as_mut(), field::END, end)
    }
}

/// The ports of a UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UdpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl UdpRepr {
    /// Length of the header [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = field::END;

    /// Decodes a header (the checksum is not verified).
    pub fn parse<T: AsRef<[u8]>>(p: &UdpPacket<T>) -> Result<Self> {
        p.check_len()?;
        Ok(UdpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
        })
    }

    /// Writes the header: the ports, the length set to the whole view's buffer (saturating at
    /// 65535) and a zero checksum. Write the payload, then call
    /// [`UdpPacket::fill_checksum`].
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut UdpPacket<T>) {
        let len = u16::try_from(p.buffer.as_ref().len()).unwrap_or(u16::MAX);
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len(len);
        p.set_checksum(0);
    }
}
