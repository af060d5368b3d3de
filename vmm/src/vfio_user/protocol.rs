//! The vfio-user wire format (the vfio-user protocol specification, as QEMU and libvfio-user
//! implement it): a 16-byte header, then the command's fixed part, then data; file
//! descriptors travel beside a message (`SCM_RIGHTS`). Encoding and the checks of what a
//! server sends are plain functions, so they are unit-tested and fuzzed without a socket.
//!
//! ```text
//! header: message ID (u16) | command (u16) | message size incl. header (u32)
//!         | flags (u32: bits 3:0 type, 0 command, 1 reply; bit 4 no reply; bit 5 error)
//!         | error (u32: an errno when bit 5 is set)
//! ```
//!
//! A reply is taken only for the command and message ID it answers, with a size between
//! the header and [`MAX_MESSAGE`]; an error reply is an error whatever its errno (a server
//! may send 0), which is the gap in the rust-vmm client this module does not have.

use thiserror::Error;

/// Header bytes.
pub const HEADER_SIZE: usize = 16;
/// The largest data transfer this client asks for and accepts in one message.
pub const MAX_DATA: u32 = 1 << 20;
/// The largest message accepted from a server: a maximal transfer and its fixed part.
pub const MAX_MESSAGE: u32 = MAX_DATA + 4096;
/// The most file descriptors this client accepts beside one message.
pub const MAX_FDS: usize = 16;

/// Command numbers.
pub mod command {
    /// Version and capabilities.
    pub const VERSION: u16 = 1;
    /// Map guest memory for the server's DMA.
    pub const DMA_MAP: u16 = 2;
    /// Unmap it.
    pub const DMA_UNMAP: u16 = 3;
    /// Regions, interrupts, flags.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// One region.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// One interrupt index.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// Interrupt eventfds.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// Read a region.
    pub const REGION_READ: u16 = 9;
    /// Write a region.
    pub const REGION_WRITE: u16 = 10;
    /// Reset the device.
    pub const DEVICE_RESET: u16 = 13;
}

const TYPE_MASK: u32 = 0xf;
const TYPE_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

/// What a server sent that this client does not take.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Fewer bytes than a header.
    #[error("a message shorter than its header")]
    Short,
    /// A size outside `[header, MAX_MESSAGE]`.
    #[error("a message of {0} bytes (at most {MAX_MESSAGE})")]
    Size(u32),
    /// A reply to another message.
    #[error("a reply to message {got} (command {command}) when {want} was waited for")]
    Mismatch {
        /// Its message ID.
        got: u16,
        /// Its command.
        command: u16,
        /// The ID waited for.
        want: u16,
    },
    /// Not marked as a reply.
    #[error("a message of type {0} where a reply was due")]
    NotAReply(u32),
    /// The server refused the command.
    #[error("refused by the server (errno {0})")]
    Refused(u32),
    /// A reply whose fixed part is shorter than the command's.
    #[error("a reply of {got} bytes where {want} are due")]
    Payload {
        /// Bytes received after the header.
        got: usize,
        /// Bytes due.
        want: usize,
    },
    /// A field out of range.
    #[error("{0}")]
    Field(&'static str),
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Message ID (a reply carries its command's).
    pub id: u16,
    /// Command.
    pub command: u16,
    /// Whole message size, header included.
    pub size: u32,
    /// Type and flags.
    pub flags: u32,
    /// Errno of an error reply.
    pub error: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut w = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        w.copy_from_slice(s);
    }
    u16::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

impl Header {
    /// A command's header for a message of `payload` bytes after it.
    #[must_use]
    pub fn command(id: u16, command: u16, payload: usize) -> Self {
        Self {
            id,
            command,
            size: u32::try_from(HEADER_SIZE + payload).unwrap_or(u32::MAX),
            flags: 0,
            error: 0,
        }
    }

    /// The 16 bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let [i0, i1] = self.id.to_le_bytes();
        let [c0, c1] = self.command.to_le_bytes();
        let [s0, s1, s2, s3] = self.size.to_le_bytes();
        let [f0, f1, f2, f3] = self.flags.to_le_bytes();
        let [e0, e1, e2, e3] = self.error.to_le_bytes();
        [
            i0, i1, c0, c1, s0, s1, s2, s3, f0, f1, f2, f3, e0, e1, e2, e3,
        ]
    }

    /// Decodes a header.
    ///
    /// # Errors
    /// [`ProtocolError::Short`].
    pub fn decode(b: &[u8]) -> Result<Self, ProtocolError> {
        if b.len() < HEADER_SIZE {
            return Err(ProtocolError::Short);
        }
        Ok(Self {
            id: u16_at(b, 0),
            command: u16_at(b, 2),
            size: u32_at(b, 4),
            flags: u32_at(b, 8),
            error: u32_at(b, 12),
        })
    }

    /// Checks a reply header against the command `command` with ID `id`; returns the
    /// bytes that follow the header.
    ///
    /// # Errors
    /// [`ProtocolError::Size`], [`ProtocolError::Mismatch`], [`ProtocolError::Refused`] or
    /// [`ProtocolError::NotAReply`].
    pub fn check_reply(&self, id: u16, command: u16) -> Result<usize, ProtocolError> {
        if (self.size as usize) < HEADER_SIZE || self.size > MAX_MESSAGE {
            return Err(ProtocolError::Size(self.size));
        }
        if self.id != id || self.command != command {
            return Err(ProtocolError::Mismatch {
                got: self.id,
                command: self.command,
                want: id,
            });
        }
        if self.flags & FLAG_ERROR != 0 {
            return Err(ProtocolError::Refused(self.error));
        }
        if self.flags & TYPE_MASK != TYPE_REPLY {
            return Err(ProtocolError::NotAReply(self.flags & TYPE_MASK));
        }
        Ok(self.size as usize - HEADER_SIZE)
    }
}

/// Fails unless `payload` has at least `want` bytes.
fn need(payload: &[u8], want: usize) -> Result<(), ProtocolError> {
    if payload.len() < want {
        return Err(ProtocolError::Payload {
            got: payload.len(),
            want,
        });
    }
    Ok(())
}

/// The capabilities a server announces in its version reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCaps {
    /// Protocol version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// File descriptors it takes beside one message (at least 1).
    pub max_msg_fds: u32,
    /// Bytes it moves in one region access.
    pub max_data_xfer_size: u32,
}

/// The version command's payload: version 0.1 and this client's capabilities.
#[must_use]
pub fn version_payload() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(&1u16.to_le_bytes());
    let caps = format!(
        r#"{{"capabilities":{{"max_msg_fds":{MAX_FDS},"max_data_xfer_size":{MAX_DATA},"migration":{{"pgsize":4096}}}}}}"#
    );
    p.extend_from_slice(caps.as_bytes());
    p.push(0);
    p
}

/// Parses a version reply. Missing capabilities take the protocol's defaults (one file
/// descriptor per message, 1 MiB per transfer); values are clamped to what this client
/// accepts.
///
/// # Errors
/// [`ProtocolError::Payload`], or [`ProtocolError::Field`] for capabilities that are not
/// JSON or are out of range.
pub fn parse_version(payload: &[u8]) -> Result<ServerCaps, ProtocolError> {
    need(payload, 4)?;
    let text = payload.get(4..).unwrap_or_default();
    let text = text.strip_suffix(&[0]).unwrap_or(text);
    let (mut max_msg_fds, mut max_data_xfer_size) = (1u64, u64::from(MAX_DATA));
    if !text.is_empty() {
        let json: serde_json::Value = serde_json::from_slice(text)
            .map_err(|_| ProtocolError::Field("version capabilities are not JSON"))?;
        let caps = json.get("capabilities");
        let number = |key: &str, default: u64| -> Result<u64, ProtocolError> {
            match caps.and_then(|c| c.get(key)) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .ok_or(ProtocolError::Field("a capability is not a number")),
            }
        };
        max_msg_fds = number("max_msg_fds", max_msg_fds)?;
        max_data_xfer_size = number("max_data_xfer_size", max_data_xfer_size)?;
    }
    if max_msg_fds == 0 || max_data_xfer_size == 0 {
        return Err(ProtocolError::Field("a zero capability"));
    }
    Ok(ServerCaps {
        major: u16_at(payload, 0),
        minor: u16_at(payload, 2),
        max_msg_fds: u32::try_from(max_msg_fds.min(MAX_FDS as u64)).unwrap_or(1),
        max_data_xfer_size: u32::try_from(max_data_xfer_size.min(u64::from(MAX_DATA)))
            .unwrap_or(MAX_DATA),
    })
}

/// What `DEVICE_GET_INFO` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Regions.
    pub regions: u32,
    /// Interrupt indexes.
    pub irqs: u32,
}

/// Little-endian words, one after another.
fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `DEVICE_GET_INFO`'s payload: argsz, flags, regions, interrupts.
#[must_use]
pub fn device_info_payload() -> Vec<u8> {
    words(&[16, 0, 0, 0])
}

/// Parses a `DEVICE_GET_INFO` reply.
///
/// # Errors
/// [`ProtocolError::Payload`].
pub fn parse_device_info(payload: &[u8]) -> Result<DeviceInfo, ProtocolError> {
    need(payload, 16)?;
    Ok(DeviceInfo {
        flags: u32_at(payload, 4),
        regions: u32_at(payload, 8),
        irqs: u32_at(payload, 12),
    })
}

/// What `DEVICE_GET_REGION_INFO` says of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*` (read, write, mmap, caps).
    pub flags: u32,
    /// Its index.
    pub index: u32,
    /// Its size.
    pub size: u64,
    /// The offset of an mmap'able region in the file descriptor sent with the reply.
    pub offset: u64,
    /// The areas of the region that may be mapped (the sparse mmap capability):
    /// (offset in the region, size), each within the region.
    pub sparse: Vec<(u64, u64)>,
}

/// The most sparse mmap areas taken of one region.
pub const MAX_SPARSE_AREAS: u32 = 16;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
const REGION_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
const CAP_SPARSE_MMAP: u16 = 1;

/// `DEVICE_GET_REGION_INFO`'s payload for region `index`, with room for a sparse mmap
/// capability of [`MAX_SPARSE_AREAS`] areas (a server sends its capabilities, and the
/// file to map, only when they fit).
#[must_use]
pub fn region_info_payload(index: u32) -> Vec<u8> {
    let argsz = 32 + 16 + 16 * MAX_SPARSE_AREAS;
    // argsz, flags, index, cap_offset, size (u64), offset (u64).
    words(&[argsz, 0, index, 0, 0, 0, 0, 0])
}

/// The sparse mmap areas in the capability chain of a region-info reply of a region of
/// `size` bytes, starting at `at`.
fn sparse_areas(
    payload: &[u8],
    mut at: usize,
    size: u64,
) -> Result<Vec<(u64, u64)>, ProtocolError> {
    let mut areas = Vec::new();
    for _ in 0..8 {
        need(payload, at + 8)?;
        let (id, next) = (u16_at(payload, at), u32_at(payload, at + 4) as usize);
        if id == CAP_SPARSE_MMAP {
            need(payload, at + 16)?;
            let n = u32_at(payload, at + 8);
            if n > MAX_SPARSE_AREAS {
                return Err(ProtocolError::Field("more sparse mmap areas than taken"));
            }
            need(payload, at + 16 + 16 * n as usize)?;
            for k in 0..n as usize {
                let offset = u64_at(payload, at + 16 + 16 * k);
                let len = u64_at(payload, at + 24 + 16 * k);
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(ProtocolError::Field("a sparse mmap area beyond its region"));
                }
                areas.push((offset, len));
            }
        }
        if next == 0 {
            return Ok(areas);
        }
        if next <= at {
            return Err(ProtocolError::Field("a capability chain that loops"));
        }
        at = next;
    }
    Err(ProtocolError::Field("a capability chain too long"))
}

/// Parses a `DEVICE_GET_REGION_INFO` reply for region `index`.
///
/// # Errors
/// [`ProtocolError::Payload`] or [`ProtocolError::Field`] (another region's info).
pub fn parse_region_info(payload: &[u8], index: u32) -> Result<RegionInfo, ProtocolError> {
    need(payload, 32)?;
    let mut info = RegionInfo {
        flags: u32_at(payload, 4),
        index: u32_at(payload, 8),
        size: u64_at(payload, 16),
        offset: u64_at(payload, 24),
        sparse: Vec::new(),
    };
    if info.index != index {
        return Err(ProtocolError::Field("the info of another region"));
    }
    let cap_offset = u32_at(payload, 12) as usize;
    if info.flags & REGION_CAPS != 0 && payload.len() > 32 {
        if cap_offset < 32 {
            return Err(ProtocolError::Field("capabilities inside the region info"));
        }
        info.sparse = sparse_areas(payload, cap_offset, info.size)?;
    }
    Ok(info)
}

/// What `DEVICE_GET_IRQ_INFO` says of one interrupt index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// The index.
    pub index: u32,
    /// Vectors.
    pub count: u32,
}

/// `DEVICE_GET_IRQ_INFO`'s payload for `index`.
#[must_use]
pub fn irq_info_payload(index: u32) -> Vec<u8> {
    words(&[16, 0, index, 0])
}

/// Parses a `DEVICE_GET_IRQ_INFO` reply for `index`.
///
/// # Errors
/// [`ProtocolError::Payload`] or [`ProtocolError::Field`].
pub fn parse_irq_info(payload: &[u8], index: u32) -> Result<IrqInfo, ProtocolError> {
    need(payload, 16)?;
    let info = IrqInfo {
        flags: u32_at(payload, 4),
        index: u32_at(payload, 8),
        count: u32_at(payload, 12),
    };
    if info.index != index {
        return Err(ProtocolError::Field("the info of another interrupt index"));
    }
    Ok(info)
}

/// `DEVICE_SET_IRQS`'s payload.
#[must_use]
pub fn set_irqs_payload(flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    words(&[20, flags, index, start, count])
}

/// A region access's fixed part: offset, region, count.
#[must_use]
pub fn region_access_payload(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(16);
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&region.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p
}

/// Parses a `REGION_READ` reply to a read of `count` bytes at `offset` of `region`;
/// returns the data.
///
/// # Errors
/// [`ProtocolError::Payload`] or [`ProtocolError::Field`] (another access, another size).
pub fn parse_region_read(
    payload: &[u8],
    region: u32,
    offset: u64,
    count: u32,
) -> Result<&[u8], ProtocolError> {
    need(payload, 16)?;
    if u64_at(payload, 0) != offset || u32_at(payload, 8) != region {
        return Err(ProtocolError::Field("the data of another access"));
    }
    if u32_at(payload, 12) != count || payload.len() != 16 + count as usize {
        return Err(ProtocolError::Field("a read of another size"));
    }
    Ok(payload.get(16..).unwrap_or_default())
}

/// `DMA_MAP`'s payload: read-write, `size` bytes of guest address `address` at `offset` in
/// the file descriptor sent beside it.
#[must_use]
pub fn dma_map_payload(offset: u64, address: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&32u32.to_le_bytes());
    p.extend_from_slice(&3u32.to_le_bytes());
    for v in [offset, address, size] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// `DMA_UNMAP`'s payload.
#[must_use]
pub fn dma_unmap_payload(address: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(24);
    p.extend_from_slice(&24u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for v in [address, size] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// Checks a whole reply message (header and payload, as received) to the command
/// `command` with ID `id`; returns the payload. What the fuzz target feeds.
///
/// # Errors
/// Any [`ProtocolError`].
pub fn parse_reply(message: &[u8], id: u16, command: u16) -> Result<&[u8], ProtocolError> {
    let header = Header::decode(message)?;
    let len = header.check_reply(id, command)?;
    let payload = message.get(HEADER_SIZE..).unwrap_or_default();
    if payload.len() != len {
        return Err(ProtocolError::Payload {
            got: payload.len(),
            want: len,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Header {
            id,
            command,
            size: u32::try_from(HEADER_SIZE + payload.len()).unwrap(),
            flags,
            error: 0,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn a_reply_is_taken_only_for_its_command_and_id_and_within_its_sizes() {
        let ok = reply(3, command::REGION_READ, 1, &[0; 20]);
        assert_eq!(parse_reply(&ok, 3, command::REGION_READ).unwrap().len(), 20);
        assert!(matches!(
            parse_reply(&ok, 4, command::REGION_READ),
            Err(ProtocolError::Mismatch { got: 3, .. })
        ));
        parse_reply(&ok, 3, command::REGION_WRITE).unwrap_err();
        assert_eq!(
            parse_reply(&reply(3, 9, 1 | FLAG_ERROR, &[]), 3, 9),
            Err(ProtocolError::Refused(0))
        );
        assert_eq!(
            parse_reply(&reply(3, 9, 0, &[]), 3, 9),
            Err(ProtocolError::NotAReply(0))
        );
        let mut lying = reply(3, 9, 1, &[]);
        lying[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(parse_reply(&lying, 3, 9), Err(ProtocolError::Size(8)));
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_reply(&lying, 3, 9),
            Err(ProtocolError::Size(u32::MAX))
        );
        assert_eq!(parse_reply(&[0; 5], 0, 0), Err(ProtocolError::Short));
    }

    #[test]
    fn payloads_are_checked_field_by_field() {
        // Version: capabilities optional, clamped, JSON or refused.
        let caps = parse_version(&[0, 0, 1, 0]).unwrap();
        assert_eq!((caps.max_msg_fds, caps.max_data_xfer_size), (1, MAX_DATA));
        let mut v = vec![0, 0, 1, 0];
        v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":1000,"max_data_xfer_size":9}}"#);
        v.push(0);
        let caps = parse_version(&v).unwrap();
        assert_eq!(
            (caps.max_msg_fds, caps.max_data_xfer_size),
            (u32::try_from(MAX_FDS).unwrap(), 9)
        );
        parse_version(b"\0\0\x01\0not json\0").unwrap_err();
        parse_version(b"\0\0\x01\0{\"capabilities\":{\"max_msg_fds\":0}}").unwrap_err();
        parse_version(&[1]).unwrap_err();
        // Region info of another region; a read of another size.
        let mut info = region_info_payload(2);
        info[16..24].copy_from_slice(&4096u64.to_le_bytes());
        assert_eq!(parse_region_info(&info, 2).unwrap().size, 4096);
        parse_region_info(&info, 3).unwrap_err();
        parse_region_info(&info[..20], 2).unwrap_err();
        // A sparse mmap capability: areas within the region are taken; one beyond it, a
        // chain that loops, too many areas, or a cut-off list are refused.
        let sparse = |areas: &[(u64, u64)], n: u32, next: u32| {
            let mut p = words(&[48 + 16 * n, REGION_CAPS, 2, 32]);
            p.extend_from_slice(&4096u64.to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            p.extend_from_slice(&CAP_SPARSE_MMAP.to_le_bytes());
            p.extend_from_slice(&1u16.to_le_bytes());
            p.extend_from_slice(&next.to_le_bytes());
            p.extend_from_slice(&n.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            for (off, len) in areas {
                p.extend_from_slice(&off.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
            }
            p
        };
        let ok = parse_region_info(&sparse(&[(0, 2048), (2048, 2048)], 2, 0), 2).unwrap();
        assert_eq!(ok.sparse, [(0, 2048), (2048, 2048)]);
        parse_region_info(&sparse(&[(4096, 1)], 1, 0), 2).unwrap_err();
        parse_region_info(&sparse(&[(u64::MAX, 2)], 1, 0), 2).unwrap_err();
        parse_region_info(&sparse(&[(0, 16)], 1, 32), 2).unwrap_err();
        parse_region_info(&sparse(&[], MAX_SPARSE_AREAS + 1, 0), 2).unwrap_err();
        parse_region_info(&sparse(&[], 1, 0), 2).unwrap_err();
        let mut read = region_access_payload(7, 0x10, 4);
        read.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(parse_region_read(&read, 7, 0x10, 4).unwrap(), &[1, 2, 3, 4]);
        parse_region_read(&read, 7, 0x10, 2).unwrap_err();
        parse_region_read(&read, 0, 0x10, 4).unwrap_err();
        parse_irq_info(&irq_info_payload(2), 1).unwrap_err();
        parse_device_info(&[0; 15]).unwrap_err();
    }
}
