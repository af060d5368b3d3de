//! PIO and MMIO buses: address ranges mapped to devices.
//!
//! An access is routed by its first address: the device whose range contains it gets the
//! whole access, at an offset from its base (so a 4-byte write to a 1-port device still
//! reaches it). Unmapped accesses are reported to the caller, which decides what the
//! guest sees.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use devices::{BusDevice, ConcurrentBusDevice};
use thiserror::Error;

/// A device shared between the bus and whoever else needs it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// What sits at a range: a device the bus locks for each access, or one that
/// serialises itself ([`ConcurrentBusDevice`]: the PCI root's routers, so that a vCPU
/// waiting for one PCI device does not hold up accesses to the others).
#[derive(Clone)]
enum Entry {
    Locked(SharedDevice),
    Concurrent(Arc<dyn ConcurrentBusDevice>),
}

impl Entry {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self {
            Self::Locked(d) => d
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(offset, data),
            Self::Concurrent(d) => d.read(offset, data),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match self {
            Self::Locked(d) => d
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(offset, data),
            Self::Concurrent(d) => d.write(offset, data),
        }
    }
}

/// Why a device could not be added.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid range at {base:#x} of length {len}")]
    InvalidRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("range [{base:#x}, +{len}) overlaps a device already at {existing:#x}")]
    Overlap {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
        /// Base of the device in the way.
        existing: u64,
    },
}

/// One bus.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Entry)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// Puts `device` at `[base, base + len)`.
    ///
    /// # Errors
    /// [`BusError::InvalidRange`] or [`BusError::Overlap`].
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        self.insert_entry(base, len, Entry::Locked(device))
    }

    /// Puts `device`, which serialises its own accesses, at `[base, base + len)`.
    ///
    /// # Errors
    /// [`BusError::InvalidRange`] or [`BusError::Overlap`].
    pub fn insert_concurrent(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn ConcurrentBusDevice>,
    ) -> Result<(), BusError> {
        self.insert_entry(base, len, Entry::Concurrent(device))
    }

    fn insert_entry(&mut self, base: u64, len: u64, device: Entry) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((&existing, _)) = self
            .devices
            .range(..end)
            .next_back()
            .filter(|(&b, (l, _))| b + l > base)
        {
            return Err(BusError::Overlap {
                base,
                len,
                existing,
            });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// Routes a read; returns `false` if nothing is mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, device)) = self.find(addr) else {
            return false;
        };
        device.read(offset, data);
        true
    }

    /// Routes a write; returns `false` if nothing is mapped at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, device)) = self.find(addr) else {
            return false;
        };
        device.write(offset, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, probe.clone()).unwrap();
        assert!(bus.write(0x3fa, &[1, 2, 3, 4]));
        assert_eq!(probe.lock().unwrap().last, Some((2, vec![1, 2, 3, 4])));
        let mut data = [0u8; 2];
        assert!(bus.read(0x3ff, &mut data));
        assert_eq!(data, [7, 7]);
    }

    #[test]
    fn unmapped_accesses_are_reported() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Probe::default())))
            .unwrap();
        assert!(!bus.write(0x3f7, &[0]));
        assert!(!bus.write(0x400, &[0]));
        assert!(!bus.read(u64::MAX, &mut [0]));
        assert!(!Bus::default().read(0, &mut [0]));
    }

    #[test]
    fn overlaps_and_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Probe::default())) };
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert_eq!(
            bus.insert(0x10f, 1, dev()),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                existing: 0x100
            })
        );
        assert!(matches!(
            bus.insert(0xf0, 0x11, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x200, 0, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x110, 1, dev()).unwrap();
        bus.insert(0xff, 1, dev()).unwrap();
    }
}
