//! A vfio-user device as a function on our PCI root: its configuration space as the
//! device reports it (IDs, class, interrupt pin), with BARs this VMM places and sizes from
//! the device's regions, and every BAR access relayed to the device process.
//!
//! BARs: a region the device reports as an I/O BAR (bit 0 of its BAR register) becomes an
//! I/O BAR in our I/O window; any other non-empty BAR region a 64-bit memory BAR at an
//! even index (an odd-index memory BAR is not offered). The device's capability list is not
//! shown yet (its MSI-X comes with per-entry interrupts); writes to the command register
//! reach the device too. A request that fails (the device process died, hung or lied) reads
//! as all ones, is dropped for writes, and is counted.

use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

use devices::pci::config::{self, Bar, ConfigChange, ConfigSpace};
use devices::pci::PciFunction;

use super::{Client, VfioUserError};

/// A vfio-user device on the root bus.
#[derive(Debug)]
pub struct VfioUserFunction {
    client: Client,
    config: ConfigSpace,
    failures: u64,
}

/// Bytes of the device's configuration space that are read: the type-0 header.
const HEADER: usize = 64;

impl VfioUserFunction {
    /// The function of the device behind `client`.
    ///
    /// # Errors
    /// The device's configuration space could not be read, or is smaller than a header.
    pub fn new(mut client: Client) -> Result<Self, VfioUserError> {
        let size = client
            .regions()
            .get(VFIO_PCI_CONFIG_REGION_INDEX as usize)
            .map_or(0, |r| r.size);
        if size < HEADER as u64 {
            return Err(VfioUserError::Request(format!(
                "a configuration space of {size} bytes"
            )));
        }
        let mut raw = [0u8; HEADER];
        for (i, word) in raw.chunks_exact_mut(4).enumerate() {
            client.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 4 * i as u64, word)?;
        }
        let [vendor0, vendor1, device0, device1, ..] = raw;
        let [revision, interface, subclass, class] = [raw[8], raw[9], raw[10], raw[11]];
        let mut config = ConfigSpace::new(
            u16::from_le_bytes([vendor0, vendor1]),
            u16::from_le_bytes([device0, device1]),
            [class, subclass, interface],
            revision,
        );
        let [sub0, sub1, sub2, sub3] = [raw[0x2c], raw[0x2d], raw[0x2e], raw[0x2f]];
        config.set_bytes(0x2c, &[sub0, sub1, sub2, sub3]);
        config.set_bytes(0x3d, &[raw[0x3d]]);
        for index in 0..6usize {
            let size = client.regions().get(index).map_or(0, |r| r.size);
            if size == 0 {
                continue;
            }
            let io = raw
                .get(config::BAR0 + 4 * index)
                .is_some_and(|b| b & 1 == 1);
            if io {
                config.add_io_bar(Bar {
                    index,
                    size: size.next_power_of_two().clamp(4, 256),
                });
            } else if index % 2 == 0 {
                config.add_bar(Bar {
                    index,
                    size: size.next_power_of_two().max(4096),
                });
            }
        }
        Ok(Self {
            client,
            config,
            failures: 0,
        })
    }

    /// Requests that failed (each read as all ones or dropped).
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Whether the connection to the device process is broken.
    #[must_use]
    pub fn lost(&self) -> bool {
        self.client.is_broken()
    }
}

impl PciFunction for VfioUserFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigChange {
        let change = self.config.write(offset, data);
        // The command register (decoding, bus mastering, INTx disable) is the device's
        // business too; BARs are ours.
        if offset < 0x06 && offset + data.len() > 0x04 {
            let command = self.config.bytes(0x04, 2).to_vec();
            if self
                .client
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &command)
                .is_err()
            {
                self.failures += 1;
            }
        }
        change
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let index = u32::try_from(bar).unwrap_or(u32::MAX);
        if self.client.region_read(index, offset, data).is_err() {
            data.fill(0xff);
            self.failures += 1;
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let index = u32::try_from(bar).unwrap_or(u32::MAX);
        if self.client.region_write(index, offset, data).is_err() {
            self.failures += 1;
        }
    }
}
