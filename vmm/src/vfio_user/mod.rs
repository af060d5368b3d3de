//! A vfio-user client: a PCI device served by another process over a Unix socket
//! (`docs/vfio-user.md` once the device is wired in; the protocol is vfio-user's, as QEMU,
//! SPDK and libvfio-user speak it).
//!
//! Why not the rust-vmm `vfio_user` crate's `Client` (its `Server` is used by the tests and
//! by our device servers): it reads fixed-size replies without looking at the reply's error
//! flag (a refused `SET_IRQS` reads as success, and an error reply's short message
//! desynchronises the stream), it computes payload sizes from the server's header with
//! unchecked subtraction and asserts on capability sizes (a lying server panics or aborts
//! the VMM), and it has no timeouts. This client checks every reply against the command and
//! message ID it answers ([`protocol::Header::check_reply`]), bounds every size, treats an
//! error reply as an error whatever its errno, times out every request, and after any of
//! these marks the connection broken: no further request is sent on it.

pub mod entries;
pub mod function;
pub mod msix;
pub mod protocol;
pub mod server;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use protocol::{command, DeviceInfo, Header, IrqInfo, ProtocolError, RegionInfo, ServerCaps};

/// How long one request may wait for its reply when nothing else is said.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most regions and interrupt indexes a device may announce.
const MAX_INDEXES: u32 = 64;

/// Why a request failed.
#[derive(Debug, Error)]
pub enum VfioUserError {
    /// The socket could not be reached.
    #[error("cannot connect to {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending, receiving or waiting failed (a timeout included); the connection is broken.
    #[error("{what} failed (the device process is gone or hung)")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server replied with something this client does not take; the connection is
    /// broken.
    #[error("bad reply to command {command}")]
    Protocol {
        /// The command.
        command: u16,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The server refused the command (an error reply); the connection stays usable.
    #[error("the device refused command {command} (errno {errno})")]
    Refused {
        /// The command.
        command: u16,
        /// The errno it sent (0 when it sent none).
        errno: u32,
    },
    /// The device is not a PCI device.
    #[error("the device is not a PCI device")]
    NotPci,
    /// A request this client will not send (a size over the server's limit, no such
    /// region or interrupt index).
    #[error("{0}")]
    Request(String),
    /// An earlier request broke the connection.
    #[error("the connection to the device is broken")]
    Broken,
}

/// A reply: its payload and the file descriptor sent with it, if any.
#[derive(Debug)]
struct Reply {
    payload: Vec<u8>,
    fd: Option<File>,
}

/// A connection to one vfio-user device.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u16,
    broken: bool,
    caps: ServerCaps,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    /// The file a region can be mapped from, when the server sent one.
    region_files: Vec<Option<File>>,
    irqs: Vec<IrqInfo>,
}

impl Client {
    /// Connects to the device at `path`, negotiates the version and reads what the device
    /// has (regions, interrupt indexes); every request waits at most `timeout`.
    ///
    /// # Errors
    /// Any [`VfioUserError`]; [`VfioUserError::NotPci`] for a device that is not PCI.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VfioUserError> {
        let stream = UnixStream::connect(path).map_err(|source| VfioUserError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |what| move |source| VfioUserError::Io { what, source };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io("setting the socket's timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setting the socket's timeout"))?;
        let mut client = Self {
            stream,
            next_id: 0,
            broken: false,
            caps: ServerCaps {
                major: 0,
                minor: 0,
                max_msg_fds: 1,
                max_data_xfer_size: protocol::MAX_DATA,
            },
            info: DeviceInfo {
                flags: 0,
                regions: 0,
                irqs: 0,
            },
            regions: Vec::new(),
            region_files: Vec::new(),
            irqs: Vec::new(),
        };
        let reply = client.request(command::VERSION, &protocol::version_payload(), &[])?;
        client.caps = protocol::parse_version(&reply.payload)
            .map_err(|e| client.protocol(command::VERSION, e))?;
        let reply = client.request(
            command::DEVICE_GET_INFO,
            &protocol::device_info_payload(),
            &[],
        )?;
        client.info = protocol::parse_device_info(&reply.payload)
            .map_err(|e| client.protocol(command::DEVICE_GET_INFO, e))?;
        if client.info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(VfioUserError::NotPci);
        }
        if client.info.regions > MAX_INDEXES || client.info.irqs > MAX_INDEXES {
            return Err(client.protocol(
                command::DEVICE_GET_INFO,
                ProtocolError::Field("more regions or interrupt indexes than a PCI device has"),
            ));
        }
        for index in 0..client.info.regions {
            let payload = protocol::region_info_payload(index);
            let reply = client.request(command::DEVICE_GET_REGION_INFO, &payload, &[])?;
            let info = protocol::parse_region_info(&reply.payload, index)
                .map_err(|e| client.protocol(command::DEVICE_GET_REGION_INFO, e))?;
            client.regions.push(info);
            client.region_files.push(reply.fd);
        }
        for index in 0..client.info.irqs {
            let payload = protocol::irq_info_payload(index);
            let reply = client.request(command::DEVICE_GET_IRQ_INFO, &payload, &[])?;
            let info = protocol::parse_irq_info(&reply.payload, index)
                .map_err(|e| client.protocol(command::DEVICE_GET_IRQ_INFO, e))?;
            client.irqs.push(info);
        }
        Ok(client)
    }

    /// What the server announced.
    #[must_use]
    pub fn caps(&self) -> ServerCaps {
        self.caps
    }

    /// The device's regions.
    #[must_use]
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The file region `index` can be mapped from (at its info's offset), if the server
    /// offered one.
    #[must_use]
    pub fn region_file(&self, index: u32) -> Option<&File> {
        self.region_files.get(index as usize)?.as_ref()
    }

    /// The device's interrupt indexes.
    #[must_use]
    pub fn irqs(&self) -> &[IrqInfo] {
        &self.irqs
    }

    /// Whether an earlier request broke the connection.
    #[must_use]
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn protocol(&mut self, command: u16, source: ProtocolError) -> VfioUserError {
        self.broken = true;
        VfioUserError::Protocol { command, source }
    }

    /// Sends `command` with `payload` (and `fds` beside it) and waits for its reply.
    fn request(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Reply, VfioUserError> {
        if self.broken {
            return Err(VfioUserError::Broken);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(id, command, payload.len()).encode();
        let sent = self.send(&header, payload, fds);
        if let Err(source) = sent {
            self.broken = true;
            return Err(VfioUserError::Io {
                what: "sending a request",
                source,
            });
        }
        let mut head = [0u8; protocol::HEADER_SIZE];
        let received = self.receive_header(&mut head);
        let fd = match received {
            Ok(fd) => fd,
            Err(source) => {
                self.broken = true;
                return Err(VfioUserError::Io {
                    what: "waiting for a reply",
                    source,
                });
            }
        };
        let reply = Header::decode(&head).map_err(|e| self.protocol(command, e))?;
        let len = match reply.check_reply(id, command) {
            Ok(len) => len,
            Err(ProtocolError::Refused(errno)) if reply.size as usize == protocol::HEADER_SIZE => {
                return Err(VfioUserError::Refused { command, errno });
            }
            Err(e) => return Err(self.protocol(command, e)),
        };
        let mut payload = vec![0u8; len];
        if let Err(source) = self.stream.read_exact(&mut payload) {
            self.broken = true;
            return Err(VfioUserError::Io {
                what: "reading a reply",
                source,
            });
        }
        Ok(Reply { payload, fd })
    }

    fn send(&mut self, header: &[u8], payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
        if fds.is_empty() {
            self.stream.write_all(header)?;
            return self.stream.write_all(payload);
        }
        // The descriptors go with the first bytes; whatever a short send left follows.
        let sent = self
            .stream
            .send_with_fds(&[header, payload], fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let rest_of_header = header.get(sent..).unwrap_or_default();
        let rest_of_payload = payload
            .get(sent.saturating_sub(header.len())..)
            .unwrap_or_default();
        self.stream.write_all(rest_of_header)?;
        self.stream.write_all(rest_of_payload)
    }

    /// Reads a header, taking the one descriptor a reply may carry.
    fn receive_header(
        &mut self,
        head: &mut [u8; protocol::HEADER_SIZE],
    ) -> io::Result<Option<File>> {
        let (n, fd) = self
            .stream
            .recv_with_fd(head)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the device closed the socket",
            ));
        }
        self.stream
            .read_exact(head.get_mut(n..).unwrap_or_default())?;
        Ok(fd)
    }

    fn region(&self, index: u32, offset: u64, len: usize) -> Result<(), VfioUserError> {
        let region = self
            .regions
            .get(index as usize)
            .ok_or_else(|| VfioUserError::Request(format!("no region {index}")))?;
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > region.size) || len > self.caps.max_data_xfer_size as usize {
            return Err(VfioUserError::Request(format!(
                "{len} bytes at {offset:#x} of region {index} ({} bytes)",
                region.size
            )));
        }
        Ok(())
    }

    /// Reads `data.len()` bytes at `offset` of region `index`.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioUserError> {
        self.region(index, offset, data.len())?;
        let count = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let payload = protocol::region_access_payload(index, offset, count);
        let reply = self.request(command::REGION_READ, &payload, &[])?;
        let bytes = protocol::parse_region_read(&reply.payload, index, offset, count)
            .map_err(|e| self.protocol(command::REGION_READ, e))?;
        data.copy_from_slice(bytes);
        Ok(())
    }

    /// Writes `data` at `offset` of region `index`.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfioUserError> {
        self.region(index, offset, data.len())?;
        let count = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut payload = protocol::region_access_payload(index, offset, count);
        payload.extend_from_slice(data);
        self.request(command::REGION_WRITE, &payload, &[])?;
        Ok(())
    }

    /// Hands `fds` to the server as the eventfds of vectors `start..` of interrupt index
    /// `index`, in as many messages as its descriptor limit needs; stops at the first
    /// refusal (the vectors sent before it keep their new eventfds).
    ///
    /// # Errors
    /// Any [`VfioUserError`]; [`VfioUserError::Refused`] is the server's refusal.
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[RawFd],
    ) -> Result<(), VfioUserError> {
        let chunk = self.caps.max_msg_fds.max(1) as usize;
        self.set_irq_eventfds_in(index, start, fds, chunk)
    }

    /// Sends eventfds for vectors of index `index` from `start` in messages of
    /// `per_message` descriptors whatever the server announced, as cloud-hypervisor sends
    /// MSI-X vectors at enable (16 per message): for the benchmark's comparison, on
    /// servers that take that many (the `vfio_user` crate's take 16).
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub(crate) fn set_irq_eventfds_in(
        &mut self,
        index: u32,
        start: u32,
        fds: &[RawFd],
        per_message: usize,
    ) -> Result<(), VfioUserError> {
        self.irq_range(index, start, fds.len())?;
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let chunk = per_message.clamp(1, protocol::MAX_FDS);
        for (k, part) in fds.chunks(chunk).enumerate() {
            let first = start + u32::try_from(k * chunk).unwrap_or(u32::MAX);
            let count = u32::try_from(part.len()).unwrap_or(u32::MAX);
            let payload = protocol::set_irqs_payload(flags, index, first, count);
            self.request(command::DEVICE_SET_IRQS, &payload, part)?;
        }
        Ok(())
    }

    /// Unmasks vector `vector` of index `index` (`DATA_NONE | ACTION_UNMASK`): VFIO's INTx
    /// after the guest's end of interrupt.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn unmask_irq(&mut self, index: u32, vector: u32) -> Result<(), VfioUserError> {
        self.irq_range(index, vector, 1)?;
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
        let payload = protocol::set_irqs_payload(flags, index, vector, 1);
        self.request(command::DEVICE_SET_IRQS, &payload, &[])?;
        Ok(())
    }

    /// Takes the eventfds of vectors `start..start + count` of index `index` back.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn clear_irqs(&mut self, index: u32, start: u32, count: u32) -> Result<(), VfioUserError> {
        self.irq_range(index, start, count as usize)?;
        let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
        let payload = protocol::set_irqs_payload(flags, index, start, count);
        self.request(command::DEVICE_SET_IRQS, &payload, &[])?;
        Ok(())
    }

    fn irq_range(&self, index: u32, start: u32, count: usize) -> Result<(), VfioUserError> {
        let irq = self
            .irqs
            .get(index as usize)
            .ok_or_else(|| VfioUserError::Request(format!("no interrupt index {index}")))?;
        let end = u64::from(start) + count as u64;
        if end > u64::from(irq.count) {
            return Err(VfioUserError::Request(format!(
                "vectors {start}..{end} of index {index} ({} vectors)",
                irq.count
            )));
        }
        Ok(())
    }

    /// Maps `size` bytes of guest memory at guest address `address` for the server's DMA,
    /// found at `offset` in the memory file `fd`.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn dma_map(
        &mut self,
        fd: RawFd,
        offset: u64,
        address: u64,
        size: u64,
    ) -> Result<(), VfioUserError> {
        let payload = protocol::dma_map_payload(offset, address, size);
        self.request(command::DMA_MAP, &payload, &[fd])?;
        Ok(())
    }

    /// Unmaps what [`Self::dma_map`] mapped at `address`.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn dma_unmap(&mut self, address: u64, size: u64) -> Result<(), VfioUserError> {
        let payload = protocol::dma_unmap_payload(address, size);
        self.request(command::DMA_UNMAP, &payload, &[])?;
        Ok(())
    }

    /// Maps every region of guest RAM for the device's DMA (`DMA_MAP` with the region's
    /// memory file and offset): RAM must be file-backed (`memory::allocate_shared`).
    ///
    /// # Errors
    /// [`VfioUserError::Request`] for RAM that is not file-backed, or the request's error.
    pub fn map_ram(&mut self, ram: &vm_memory::GuestMemoryMmap) -> Result<(), VfioUserError> {
        use std::os::fd::AsRawFd;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for region in ram.iter() {
            let file = region.file_offset().ok_or_else(|| {
                VfioUserError::Request("guest RAM is not in a memory file".into())
            })?;
            self.dma_map(
                file.file().as_raw_fd(),
                file.start(),
                region.start_addr().0,
                region.len(),
            )?;
        }
        Ok(())
    }

    /// Resets the device.
    ///
    /// # Errors
    /// Any [`VfioUserError`].
    pub fn reset(&mut self) -> Result<(), VfioUserError> {
        self.request(command::DEVICE_RESET, &[], &[])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
