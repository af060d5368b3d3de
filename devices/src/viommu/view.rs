//! A device's view of guest memory through the unit: a vm-memory `GuestMemory` whose
//! every access is translated by one requester ([`RequesterDma`]) and then made on the
//! guest-physical memory underneath, so slices carry the physical regions' dirty bitmap.

use std::iter::FusedIterator;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    Permissions, VolatileSlice,
};

use super::dma::RequesterDma;

/// Guest-physical pieces of one access: the first inline (an access within one page, or
/// across pages that follow each other in guest memory, is one piece), more on the heap.
#[derive(Debug, Default, Clone)]
pub struct Pieces {
    first: (u64, u64),
    more: Vec<(u64, u64)>,
}

impl Pieces {
    /// One piece.
    #[must_use]
    pub fn one(addr: u64, len: usize) -> Self {
        let mut p = Self::default();
        p.push(addr, u64::try_from(len).unwrap_or(u64::MAX));
        p
    }

    /// Appends `len` bytes at `addr`, joined to the last piece when they follow it.
    pub fn push(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.first.1 == 0 {
            self.first = (addr, len);
            return;
        }
        let last = self.more.last_mut().unwrap_or(&mut self.first);
        if last.0.checked_add(last.1) == Some(addr) {
            last.1 += len;
        } else {
            self.more.push((addr, len));
        }
    }

    /// Piece `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<(u64, u64)> {
        match i {
            0 => (self.first.1 != 0).then_some(self.first),
            _ => self.more.get(i - 1).copied(),
        }
    }

    /// How many pieces.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.first.1 != 0) + self.more.len()
    }

    /// Whether there are none (an empty access).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.first.1 == 0
    }
}

/// Guest memory `B` as requester `requester` reaches it through the unit.
#[derive(Debug, Clone)]
pub struct DmaView<B> {
    backend: B,
    requester: RequesterDma,
}

impl<B> DmaView<B> {
    /// `backend` seen by `requester`.
    pub fn new(backend: B, requester: RequesterDma) -> Self {
        Self { backend, requester }
    }

    /// The requester.
    #[must_use]
    pub fn requester(&self) -> &RequesterDma {
        &self.requester
    }
}

/// The slices of one translated access, piece by piece.
#[derive(Debug)]
pub struct DmaSlices<'a, B: GuestMemoryBackend> {
    backend: &'a B,
    pieces: Pieces,
    next: usize,
    current: Option<GuestMemoryBackendSliceIterator<'a, B>>,
    done: bool,
}

impl<'a, B: GuestMemoryBackend> Iterator for DmaSlices<'a, B> {
    type Item =
        vm_memory::GuestMemoryResult<VolatileSlice<'a, BS<'a, <B::R as GuestMemoryRegion>::B>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if let Some(item) = self.current.as_mut().and_then(Iterator::next) {
                if item.is_err() {
                    self.done = true;
                }
                return Some(item);
            }
            let Some((addr, len)) = self.pieces.get(self.next) else {
                self.done = true;
                return None;
            };
            self.next += 1;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            self.current = Some(self.backend.get_slices(GuestAddress(addr), len));
        }
    }
}

impl<B: GuestMemoryBackend> FusedIterator for DmaSlices<'_, B> {}

impl<'a, B: GuestMemoryBackend> GuestMemorySliceIterator<'a, BS<'a, <B::R as GuestMemoryRegion>::B>>
    for DmaSlices<'a, B>
{
}

impl<B: GuestMemoryBackend> GuestMemory for DmaView<B> {
    type PhysicalMemory = B;
    type Bitmap = <B::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let Ok(pieces) = self.requester.resolve(addr.0, count, access) else {
            return false;
        };
        (0..pieces.len()).all(|i| {
            pieces.get(i).is_some_and(|(at, len)| {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                self.backend.check_range(GuestAddress(at), len)
            })
        })
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>, GuestMemoryError> {
        if !self.requester.translating() {
            // As it is: the backend's own slices.
            return Ok(DmaSlices {
                backend: &self.backend,
                pieces: Pieces::default(),
                next: 0,
                current: Some(self.backend.get_slices(addr, count)),
                done: false,
            });
        }
        let pieces = self
            .requester
            .resolve(addr.0, count, access)
            .map_err(GuestMemoryError::IommuError)?;
        Ok(DmaSlices {
            backend: &self.backend,
            pieces,
            next: 0,
            current: None,
            done: false,
        })
    }
}
