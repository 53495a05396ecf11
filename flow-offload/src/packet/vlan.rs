//! IEEE 802.1Q VLAN tags.

use super::{clamp, clamp_mut, get_u16, set_u16, truncated, Header, Result};

/// A view of the 4 bytes of an 802.1Q tag that follow the MAC addresses and the 0x8100 TPID
/// (i.e. an [`EthernetFrame`](super::EthernetFrame)'s payload when its EtherType is
/// [`VLAN`](super::ethertype::VLAN)): the tag control information (PCP, DEI, VID) and the inner
/// EtherType. The payload is the L3 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanTag<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const TCI: usize = 0;
    pub const ETHERTYPE: usize = 2;
    pub const PAYLOAD: usize = 4;
}

impl<T: AsRef<[u8]>> VlanTag<T> {
    /// Length of the tag.
    pub const HEADER_LEN: usize = field::PAYLOAD;

    /// A view without any check.
    pub fn new_unchecked(buffer: T) -> Self {
        VlanTag { buffer }
    }

    /// A view, if the buffer holds the tag.
    pub fn new_checked(buffer: T) -> Result<Self> {
        let v = Self::new_unchecked(buffer);
        v.check_len()?;
        Ok(v)
    }

    /// Checks that the buffer holds the tag.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < Self::HEADER_LEN {
            Err(truncated(Header::Vlan))
        } else {
            Ok(())
        }
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The whole tag control information.
    pub fn tci(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::TCI)
    }

    /// Priority code point (3 bits).
    pub fn pcp(&self) -> u8 {
        (self.tci() >> 13) as u8
    }

    /// Drop eligible indicator.
    pub fn dei(&self) -> bool {
        self.tci() & 0x1000 != 0
    }

    /// VLAN identifier (12 bits).
    pub fn vid(&self) -> u16 {
        self.tci() & 0x0FFF
    }

    /// The inner EtherType.
    pub fn ethertype(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::ETHERTYPE)
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> VlanTag<&'a T> {
    /// Everything after the tag.
    pub fn payload(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), field::PAYLOAD, usize::MAX)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VlanTag<T> {
    /// Sets the whole tag control information.
    pub fn set_tci(&mut self, tci: u16) {
        set_u16(self.buffer.as_mut(), field::TCI, tci);
    }

    /// Sets the priority code point (low 3 bits used).
    pub fn set_pcp(&mut self, pcp: u8) {
        let tci = (self.tci() & 0x1FFF) | (u16::from(pcp & 7) << 13);
        self.set_tci(tci);
    }

    /// Sets the drop eligible indicator.
    pub fn set_dei(&mut self, dei: bool) {
        let tci = (self.tci() & !0x1000) | if dei { 0x1000 } else { 0 };
        self.set_tci(tci);
    }

    /// Sets the VLAN identifier (low 12 bits used).
    pub fn set_vid(&mut self, vid: u16) {
        let tci = (self.tci() & 0xF000) | (vid & 0x0FFF);
        self.set_tci(tci);
    }

    /// Sets the inner EtherType.
    pub fn set_ethertype(&mut self, t: u16) {
        set_u16(self.buffer.as_mut(), field::ETHERTYPE, t);
    }

    /// Everything after the tag, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        clamp_mut(self.buffer.as_mut(), field::PAYLOAD, usize::MAX)
    }
}

/// The fields of an 802.1Q tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VlanRepr {
    /// Priority code point, 0..=7.
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN id, 0..=4095.
    pub vid: u16,
    /// Inner EtherType.
    pub ethertype: u16,
}

impl VlanRepr {
    /// Length of the tag [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = field::PAYLOAD;

    /// Decodes a tag.
    pub fn parse<T: AsRef<[u8]>>(tag: &VlanTag<T>) -> Result<Self> {
        tag.check_len()?;
        Ok(VlanRepr {
            pcp: tag.pcp(),
            dei: tag.dei(),
            vid: tag.vid(),
            ethertype: tag.ethertype(),
        })
    }

    /// Writes the tag (out-of-range `pcp`/`vid` bits are masked off).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, tag: &mut VlanTag<T>) {
        let tci = (u16::from(self.pcp & 7) << 13)
            | if self.dei { 0x1000 } else { 0 }
            | (self.vid & 0x0FFF);
        tag.set_tci(tci);
        tag.set_ethertype(self.ethertype);
    }
}
