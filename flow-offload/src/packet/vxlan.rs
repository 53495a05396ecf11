//! VXLAN headers (RFC 7348).

use super::{
    clamp, clamp_mut, get_u32, get_u8, malformed, set_u32, set_u8, truncated, Header, Result,
};

/// The I flag: the VNI is valid.
pub const FLAG_I: u8 = 0x08;

/// A view of a VXLAN header (the UDP payload): flags, 24 reserved bits, the 24-bit VNI, 8
/// reserved bits; the payload is the inner Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    pub const FLAGS: usize = 0;
    pub const VNI: usize = 4;
    pub const END: usize = 8;
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    /// Length of the header.
    pub const HEADER_LEN: usize = field::END;

    /// A view without any check.
    pub fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }

    /// A view, if the buffer holds the 8-byte header (the flags are not checked; see
    /// [`VxlanRepr::parse`]).
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }

    /// Checks the buffer holds the header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < field::END {
            Err(truncated(Header::Vxlan))
        } else {
            Ok(())
        }
    }

    /// The buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The flags byte ([`FLAG_I`]).
    pub fn flags(&self) -> u8 {
        get_u8(self.buffer.as_ref(), field::FLAGS)
    }

    /// The VXLAN network identifier (24 bits).
    pub fn vni(&self) -> u32 {
        get_u32(self.buffer.as_ref(), field::VNI) >> 8
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> VxlanPacket<&'a T> {
    /// The inner Ethernet frame.
    pub fn payload(&self) -> &'a [u8] {
        let buf: &'a T = self.buffer;
        clamp(buf.as_ref(), field::END, usize::MAX)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Sets the flags byte.
    pub fn set_flags(&mut self, v: u8) {
        set_u8(self.buffer.as_mut(), field::FLAGS, v);
    }

    /// Sets the VNI (low 24 bits used); clears the reserved byte after it.
    pub fn set_vni(&mut self, vni: u32) {
        set_u32(self.buffer.as_mut(), field::VNI, (vni & 0x00FF_FFFF) << 8);
    }

    /// The inner Ethernet frame, mutably.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        clamp_mut(self.buffer.as_mut(), field::END, usize::MAX)
    }
}

/// The fields of a VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanRepr {
    /// VNI (24 bits).
    pub vni: u32,
}

impl VxlanRepr {
    /// Length of the header [`emit`](Self::emit) writes.
    pub const HEADER_LEN: usize = field::END;

    /// Decodes a header; `Malformed` if the I flag is clear.
    pub fn parse<T: AsRef<[u8]>>(p: &VxlanPacket<T>) -> Result<Self> {
        p.check_len()?;
        if p.flags() & FLAG_I == 0 {
            return Err(malformed(Header::Vxlan));
        }
        Ok(VxlanRepr { vni: p.vni() })
    }

    /// Writes the header: flags = I, reserved bits zero, the VNI masked to 24 bits.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut VxlanPacket<T>) {
        set_u32(p.buffer.as_mut(), 0, u32::from(FLAG_I) << 24);
        p.set_vni(self.vni);
    }
}
