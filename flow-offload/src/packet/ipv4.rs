//! IPv4 headers (RFC 791).

use core::net::Ipv4Addr;

use super::checksum;
use super::{
    clamp, clamp_mut, get_array, get_u16, get_u8, malformed, set_bytes, set_u16, set_u8, truncated,
    Header, Result,
};

/// A view of an IPv4 packet.
///
/// [`new_checked`](Self::new_checked) accepts a buffer holding the whole header and the
/// whole packet as declared by the total length: version 4, IHL ≥ 5, header length ≤ total
/// length ≤ buffer length. Bytes after the total length (Ethernet padding) are ignored by
/// [`payload`](Self::payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    pub const END: usize = 20;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1FFF;

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Length of a header without options.
    pub const HEADER_LEN: usize = field::END;

    /// A view without any check.
    pub fn new_unchecked(buffer: T) -> Self {
        Ipv4Packet { buffer }
    }

    /// A view, if [`check_len`](Self::check_len) passes.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer holds a header and the packet it declares: `Truncated` if the buffer
    /// is shorter than 20 bytes, the header length or the total length; `Malformed` if the
    /// version is not 4, IHL < 5 or the total length is less than the header length.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < field::END {
            return Err(truncated(Header::Ipv4));
        }
        if self.version() != 4 || self.header_len() < field::END {
            return Err(malformed(Header::Ipv4));
        }
        if self.header_len() > len {
            return Err(truncated(Header::Ipv4));
        }
        let total = usize::from(self.total_len());
        if total < self.header_len() {
            return Err(malformed(Header::Ipv4));
        }
        if total > len {
            return Err(truncated(Header::Ipv4));
        }
        Ok(())
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version (4).
    pub fn version(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::VER_IHL) >> 4
    }

    /// Header length in bytes (IHL × 4).
    pub fn header_len(&self) -> usize {
        usize::from(get_u8(self.buffer.as_ref(), field::VER_IHL) & 0x0F) * 4
    }

    /// The former type-of-service byte: DSCP (6 bits) and ECN (2 bits).
    pub fn dscp_ecn(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::DSCP_ECN)
    }

    /// Differentiated services code point.
    pub fn dscp(&self) -> u8 {
        self.dscp_ecn() >> 2
    }

    /// Explicit congestion notification.
    pub fn ecn(&self) -> u8 {
        self.dscp_ecn() & 3
    }

    /// Total length (header and payload).
    pub fn total_len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::IDENT)
    }

    fn flags_offset(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::FLG_OFF)
    }

    /// Don't-fragment flag.
    pub fn dont_frag(&self) -> bool {
        self.flags_offset() & FLAG_DF != 0
    }

    /// More-fragments flag.
    pub fn more_frags(&self) -> bool {
        self.flags_offset() & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the 13-bit field × 8).
    pub fn frag_offset(&self) -> u16 {
        (self.flags_offset() & OFFSET_MASK) << 3
    }

    /// Whether this is a fragment (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & (FLAG_MF | OFFSET_MASK) != 0
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::TTL)
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::PROTOCOL)
    }

    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Source address.
    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::SRC))
    }

    /// Destination address.
    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.buffer.as_ref(), field::DST))
    }

    /// Whether the header checksum is correct. False if the header is not all in the buffer.
    pub fn verify_checksum(&self) -> bool {
        let hl = self.header_len();
        hl >= field::END
            && hl <= self.buffer.as_ref().len()
            && checksum::fold(checksum::sum(self.header_bytes())) == 0xFFFF
    }

    fn header_bytes(&self) -> &[u8] {
        clamp(self.buffer.as_ref(), 0, self.header_len())
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Ipv4Packet<&'a T> {
    /// The options (between byte 20 and the header length).
    pub fn options(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), field::END, self.header_len())
    }

    /// The header bytes (clamped to the buffer).
    pub fn header(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), 0, self.header_len())
    }

    /// The payload: from the header length to the total length (clamped to the buffer).
    pub fn payload(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(
            buf.as_ref(),
            self.header_len(),
            usize::from(self.total_len()),
        )
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets the version.
    pub fn set_version(&mut self, v: u8) {
        let b = get_u8(self.buffer.as_ref(), field::VER_IHL);
        set_u8(self.buffer.as_mut(), field::VER_IHL, (b & 0x0F) | (v << 4));
    }

    /// Sets the header length in bytes (rounded down to a multiple of 4, at most 60).
    pub fn set_header_len(&mut self, len: usize) {
        let ihl = (len / 4).min(15) as u8;
        let b = get_u8(self.buffer.as_ref(), field::VER_IHL);
        set_u8(self.buffer.as_mut(), field::VER_IHL, (b & 0xF0) | ihl);
    }

    /// Sets the DSCP/ECN byte.
    pub fn set_dscp_ecn(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::DSCP_ECN, v);
    }

    /// Sets the total length.
    pub fn set_total_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::LENGTH, v);
    }

    /// Sets the identification.
    pub fn set_ident(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::IDENT, v);
    }

    fn set_flags_offset(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::FLG_OFF, v);
    }

    /// Sets the don't-fragment flag.
    pub fn set_dont_frag(&mut self, df: bool) {
        let v = (self.flags_offset() & !FLAG_DF) | if df { FLAG_DF } else { 0 };
        self.set_flags_offset(v);
    }

    /// Sets the more-fragments flag.
    pub fn set_more_frags(&mut self, mf: bool) {
        let v = (self.flags_offset() & !FLAG_MF) | if mf { FLAG_MF } else { 0 };
        self.set_flags_offset(v);
    }

    /// Sets the fragment offset in bytes (rounded down to a multiple of 8).
    pub fn set_frag_offset(&mut self, bytes: u16) {
        let v = (self.flags_offset() & !OFFSET_MASK) | (bytes >> 3);
        self.set_flags_offset(v);
    }

    /// Sets the time to live.
    pub fn set_ttl(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::TTL, v);
    }

    /// Sets the protocol.
    pub fn set_protocol(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::PROTOCOL, v);
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v);
    }

    /// Sets the source address.
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        set_bytes(self.buffer.as_mut(), field::SRC, &a.octets());
    }

    /// Sets the destination address.
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        set_bytes(self.buffer.as_mut(), field::DST, &a.octets());
    }

    /// Computes and writes the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::finish(checksum::sum(self.header_bytes()));
        self.set_checksum(c);
    }

    /// The options, mutably.
    pub fn options_mut(&mut self) -> &mut [u8] {
        let hl = self.header_len();
        clamp_mut(self.buffer.as_mut(), field::END, hl)
    }

    /// The payload (header length to total length), mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), usize::from(self.total_len()));
        clamp_mut(self.buffer.as_mut(), hl, tl)
    }
}

/// The fields of an option-less, unfragmented IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Repr {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Protocol of the payload.
    pub protocol: u8,
    /// Time to live.
    pub ttl: u8,
    /// DSCP and ECN byte.
    pub dscp_ecn: u8,
    /// Identification.
    pub ident: u16,
    /// Don't-fragment flag.
    pub dont_frag: bool,
    /// Payload length in bytes.
    pub payload_len: usize,
}

impl Ipv4Repr {
    /// Length of the header [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = field::END;

    /// Decodes a header. Options, MF and the fragment offset are not represented (the payload
    /// length is the total length less the header length); the checksum is not verified.
    pub fn parse<T: AsRef<[u8]>>(p: &Ipv4Packet<T>) -> Result<Self> {
        p.check_len()?;
        Ok(Ipv4Repr {
            src: p.src_addr(),
            dst: p.dst_addr(),
            protocol: p.protocol(),
            ttl: p.ttl(),
            dscp_ecn: p.dscp_ecn(),
            ident: p.ident(),
            dont_frag: p.dont_frag(),
            payload_len: usize::from(p.total_len()).saturating_sub(p.header_len()),
        })
    }

    /// Header plus payload length.
    pub fn buffer_len(&self) -> usize {
        Self::HEADER_LEN + self.payload_len
    }

    /// Writes a 20-byte header with its checksum. The total length saturates at 65535.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut Ipv4Packet<T>) {
        p.set_version(4);
        p.set_header_len(field::END);
        p.set_dscp_ecn(self.dscp_ecn);
        p.set_total_len(u16::try_from(self.buffer_len()).unwrap_or(u16::MAX));
        p.set_ident(self.ident);
        p.set_flags_offset(if self.dont_frag { FLAG_DF } else { 0 });
        p.set_ttl(self.ttl);
        p.set_protocol(self.protocol);
        p.set_src_addr(self.src);
        p.set_dst_addr(self.dst);
        p.fill_checksum();
    }
}
