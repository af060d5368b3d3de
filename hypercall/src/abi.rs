//! The IRTE hypercall ABI, version 1. `docs/hypercall.md` is the same contract in prose,
//! and `resources/include/irq_hypercall.h` in C (kept identical by a test).
//!
//! A call is a 4-byte `out` of the call number to [`crate::platform::HYPERCALL_PORT`]:
//!
//! | register | in | out |
//! |---|---|---|
//! | EAX | call number | status ([`status`]) in RAX |
//! | RDX | the doorbell port | preserved |
//! | RCX | requester ID (PCI bus << 8 \| device << 3 \| function) | preserved |
//! | RSI | argument 1 | result 1 |
//! | RDI | argument 2 | result 2 |
//! | R8  | argument 3 | result 3 |
//! | R9  | - | result 4 |
//!
//! Result registers a call does not define are preserved. A call that fails changes
//! nothing but RAX, except that a `BATCH` refused after its array was read writes each
//! entry's status and RSI = 0. A 1- or 2-byte `out` to the doorbell is not a call: it is
//! answered [`status::UNSUPPORTED`] in RAX and changes nothing else.

/// Call numbers.
pub mod call {
    /// Limits and what is left: RSI = table size, RDI = unallocated entries, R8 = entries
    /// the requester may still allocate, R9 = routes left for best-effort targets.
    pub const QUERY: u32 = 0;
    /// Allocates RSI entries (consecutive) with flags RDI ([`super::alloc`]) for the
    /// requester. RSI = first index.
    pub const ALLOCATE: u32 = 1;
    /// Updates entry RSI to the target word RDI ([`super::target`]): activation,
    /// retarget or (present bit clear) deactivation; allocates, moves or frees the
    /// backing host interrupt.
    pub const UPDATE: u32 = 2;
    /// Frees RDI entries from RSI (live ones are deactivated first).
    pub const FREE: u32 = 3;
    /// Applies the RDI updates of the array at guest-physical RSI ([`super::batch`]), all
    /// or none, with at most one route commit. RSI = entries applied.
    pub const BATCH: u32 = 4;
    /// The remappable-format MSI a device slot must hold for entry RSI: RSI = address,
    /// RDI = data. The message never changes while the entry is allocated.
    pub const COMPOSE: u32 = 5;
    /// ABI 1.1: the requester's driver accepts the negotiable features in RSI
    /// ([`super::features::NEGOTIABLE`]; 0 withdraws them). RSI = the features now in
    /// force for the requester, RDI = [`super::MINOR_VERSION`].
    pub const SET_FEATURES: u32 = 6;
}

/// Status codes in RAX.
pub mod status {
    /// Done.
    pub const OK: u64 = 0;
    /// An argument is malformed: reserved bits, vector below 16, an APIC ID with no vCPU,
    /// an index beyond the table, a count of zero or beyond the limits.
    pub const INVALID_ARGUMENT: u64 = 1;
    /// No room: no free block of entries, or no host interrupt (route) for a new target.
    pub const NO_SPACE: u64 = 2;
    /// The requester or the VM is at its quota.
    pub const QUOTA_EXCEEDED: u64 = 3;
    /// Too many calls: the VM is being throttled; try again later.
    pub const BUSY: u64 = 4;
    /// The requester is not a device of this VM, or the entry belongs to another.
    pub const SOURCE_ID_NOT_PERMITTED: u64 = 5;
    /// The entry is not allocated.
    pub const NOT_ALLOCATED: u64 = 6;
    /// A guest-physical address is outside RAM or misaligned.
    pub const BAD_GUEST_ADDRESS: u64 = 7;
    /// Unknown call, or a delivery mode this interface does not offer (SMI, INIT, ExtINT).
    pub const UNSUPPORTED: u64 = 8;
    /// Batch entries only: this entry was valid but the batch was not applied.
    pub const NOT_APPLIED: u64 = 9;
    /// ABI 1.1, only to a requester whose driver accepted
    /// [`super::features::HOST_ERROR`]: the host failed to carry out the change (a KVM
    /// call or a host resource failed); nothing was applied and the previous state is in
    /// force. Retrying, now or later, may succeed. Without the feature this is
    /// [`NO_SPACE`].
    pub const HOST_ERROR: u64 = 10;

    /// Whether a call that failed with `status` may succeed if repeated unchanged.
    #[must_use]
    pub const fn retryable(status: u64) -> bool {
        matches!(status, BUSY | HOST_ERROR)
    }
}

/// Allocation flags (RDI of [`call::ALLOCATE`]).
pub mod alloc {
    /// Managed: a guaranteed reservation, so that activating the entries later cannot
    /// fail for lack of host resources.
    pub const MANAGED: u64 = 1 << 0;
    /// Aligned: the block starts at a multiple of the next power of two of its size
    /// (multi-message MSI adds the message number to the subhandle).
    pub const ALIGNED: u64 = 1 << 1;
    /// Every defined flag; others are reserved.
    pub const ALL: u64 = MANAGED | ALIGNED;
}

/// The 64-bit target word of an update.
///
/// | bits | field |
/// |---|---|
/// | 7:0 | vector (16-255) |
/// | 10:8 | delivery mode: 0 fixed, 1 lowest priority, 4 NMI |
/// | 11 | trigger mode: 1 level |
/// | 12 | destination mode: 1 logical |
/// | 13 | redirection hint |
/// | 14 | reserved (0) |
/// | 15 | present: 0 deactivates the entry (all other bits must then be 0) |
/// | 31:16 | reserved (0) |
/// | 63:32 | destination: an APIC ID of a vCPU in physical mode, a logical destination otherwise |
pub mod target {
    /// Vector mask.
    pub const VECTOR: u64 = 0xff;
    /// Delivery-mode shift and mask.
    pub const DELIVERY_SHIFT: u32 = 8;
    /// Delivery-mode mask (after the shift).
    pub const DELIVERY_MASK: u64 = 7;
    /// Level-triggered.
    pub const LEVEL: u64 = 1 << 11;
    /// Logical destination mode.
    pub const LOGICAL: u64 = 1 << 12;
    /// Redirection hint.
    pub const REDIRECTION_HINT: u64 = 1 << 13;
    /// Present.
    pub const PRESENT: u64 = 1 << 15;
    /// Destination shift.
    pub const DEST_SHIFT: u32 = 32;
    /// Reserved bits.
    pub const RESERVED: u64 = (1 << 14) | 0xffff_0000;
    /// Lowest vector an entry may deliver.
    pub const MIN_VECTOR: u64 = 16;

    /// A present, fixed, edge-triggered, physical target word.
    #[must_use]
    pub const fn fixed(apic_id: u32, vector: u8) -> u64 {
        super::TargetWord::fixed(apic_id, vector).encode()
    }
}

/// The batch array: `count` entries of [`batch::ENTRY_SIZE`] bytes at a 16-byte aligned
/// guest-physical address, all in RAM.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 4 | entry index |
/// | 4 | 4 | status, written by the host ([`status`]) |
/// | 8 | 8 | target word ([`target`]) |
///
/// All or none: when every entry is valid and the host can back them all, all are applied
/// (one route commit at most) and every status is `OK`. Otherwise none is applied; each
/// invalid entry's status says why, the others read `NOT_APPLIED`, and RAX holds the
/// first entry's error.
pub mod batch {
    /// Bytes per entry.
    pub const ENTRY_SIZE: u64 = 16;
    /// Alignment of the array.
    pub const ALIGN: u64 = 16;
    /// The most entries in one call.
    pub const MAX_ENTRIES: u64 = 4096;
}

/// Feature bits (EBX of the interface CPUID leaf).
pub mod features {
    /// [`super::call::BATCH`] is offered.
    pub const BATCH: u32 = 1 << 0;
    /// Managed allocations are offered.
    pub const MANAGED: u32 = 1 << 1;
    /// [`super::call::COMPOSE`] is offered.
    pub const COMPOSE: u32 = 1 << 2;
    /// Destinations are 32-bit x2APIC IDs.
    pub const X2APIC_DEST: u32 = 1 << 3;
    /// Everything version 1 offers.
    pub const V1: u32 = BATCH | MANAGED | COMPOSE | X2APIC_DEST;
    /// ABI 1.1: [`super::call::SET_FEATURES`] is offered, and a driver that accepts this
    /// feature gets [`super::status::HOST_ERROR`] for a host failure instead of
    /// `NO_SPACE`.
    pub const HOST_ERROR: u32 = 1 << 4;
    /// The features a driver must accept before the host uses them.
    pub const NEGOTIABLE: u32 = HOST_ERROR;
    /// Everything version 1.1 offers (what this VMM reports).
    pub const V1_1: u32 = V1 | HOST_ERROR;
}

/// The ABI version this crate describes (CPUID reports the major version).
pub const VERSION: u32 = 1;
/// Its minor version ([`call::SET_FEATURES`] reports it); feature
/// [`features::HOST_ERROR`] marks it in CPUID.
pub const MINOR_VERSION: u32 = 1;

const fn flag(on: bool, bit: u64) -> u64 {
    if on {
        bit
    } else {
        0
    }
}

/// A decoded target word ([`target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TargetWord {
    /// Bit 15: the entry is active. A word without it must be all zero.
    pub present: bool,
    /// Bits 7:0.
    pub vector: u8,
    /// Bits 10:8 (0 fixed, 1 lowest priority, 4 NMI; others are refused by the host).
    pub delivery: u8,
    /// Bit 11: level-triggered.
    pub level: bool,
    /// Bit 12: logical destination mode.
    pub logical: bool,
    /// Bit 13: redirection hint.
    pub redirection_hint: bool,
    /// Bits 63:32: destination.
    pub dest: u32,
}

/// Why a target word is malformed (the host answers `INVALID_ARGUMENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Reserved bits set, or bits set in a word without the present bit.
    Reserved,
    /// A vector below [`target::MIN_VECTOR`].
    Vector,
}

impl TargetWord {
    /// The word that deactivates an entry.
    pub const ABSENT: u64 = 0;

    /// A present, fixed, edge-triggered, physical target.
    #[must_use]
    pub const fn fixed(dest: u32, vector: u8) -> Self {
        Self {
            present: true,
            vector,
            delivery: 0,
            level: false,
            logical: false,
            redirection_hint: false,
            dest,
        }
    }

    /// The 64-bit word.
    #[must_use]
    pub const fn encode(&self) -> u64 {
        if !self.present {
            return Self::ABSENT;
        }
        self.vector as u64
            | ((self.delivery as u64 & target::DELIVERY_MASK) << target::DELIVERY_SHIFT)
            | flag(self.level, target::LEVEL)
            | flag(self.logical, target::LOGICAL)
            | flag(self.redirection_hint, target::REDIRECTION_HINT)
            | target::PRESENT
            | ((self.dest as u64) << target::DEST_SHIFT)
    }

    /// Decodes a word, checking reserved bits and the vector.
    ///
    /// # Errors
    /// [`TargetError`].
    pub const fn decode(word: u64) -> Result<Self, TargetError> {
        if word & target::PRESENT == 0 {
            return if word == 0 {
                Ok(Self {
                    present: false,
                    vector: 0,
                    delivery: 0,
                    level: false,
                    logical: false,
                    redirection_hint: false,
                    dest: 0,
                })
            } else {
                Err(TargetError::Reserved)
            };
        }
        if word & target::RESERVED != 0 {
            return Err(TargetError::Reserved);
        }
        if word & target::VECTOR < target::MIN_VECTOR {
            return Err(TargetError::Vector);
        }
        Ok(Self {
            present: true,
            vector: (word & target::VECTOR) as u8,
            delivery: ((word >> target::DELIVERY_SHIFT) & target::DELIVERY_MASK) as u8,
            level: word & target::LEVEL != 0,
            logical: word & target::LOGICAL != 0,
            redirection_hint: word & target::REDIRECTION_HINT != 0,
            dest: (word >> target::DEST_SHIFT) as u32,
        })
    }
}

/// One entry of a batch array ([`batch`]), in its 16-byte little-endian layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchEntry {
    /// The entry to update.
    pub index: u32,
    /// Written by the host.
    pub status: u32,
    /// The target word.
    pub target: u64,
}

impl BatchEntry {
    /// The 16 bytes of the entry.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.index.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..].copy_from_slice(&self.target.to_le_bytes());
        b
    }

    /// The entry in 16 bytes.
    #[must_use]
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let [i0, i1, i2, i3, s0, s1, s2, s3, t @ ..] = *b;
        Self {
            index: u32::from_le_bytes([i0, i1, i2, i3]),
            status: u32::from_le_bytes([s0, s1, s2, s3]),
            target: u64::from_le_bytes(t),
        }
    }

    /// Offset of the status field in an entry.
    pub const STATUS_OFFSET: u64 = 4;
}

/// The registers of a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
    /// Call number in, status out.
    pub rax: u64,
    /// Requester.
    pub rcx: u64,
    /// Argument / result 1.
    pub rsi: u64,
    /// Argument / result 2.
    pub rdi: u64,
    /// Argument / result 3.
    pub r8: u64,
    /// Result 4.
    pub r9: u64,
}

/// Issues a call from a guest running in ring 0 (`port` from CPUID discovery).
///
/// # Safety
/// The caller must be a guest of this VMM in ring 0, and any guest-physical address it
/// passes must be memory the host may read and write for the call's duration.
#[cfg(target_arch = "x86_64")]
pub unsafe fn invoke(port: u16, regs: &mut Registers) {
    // SAFETY: `out` to the doorbell port; the host reads and writes only the registers
    // named here (RDX is preserved).
    unsafe {
        core::arch::asm!(
            "out dx, eax",
            inout("rax") regs.rax,
            in("dx") port,
            inout("rcx") regs.rcx,
            inout("rsi") regs.rsi,
            inout("rdi") regs.rdi,
            inout("r8") regs.r8,
            inout("r9") regs.r9,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_words_round_trip() {
        let t = TargetWord {
            present: true,
            vector: 0x41,
            delivery: 1,
            level: true,
            logical: true,
            redirection_hint: true,
            dest: 0x1_0002,
        };
        let word = t.encode();
        assert_eq!(word, 0x0001_0002_0000_b941);
        assert_eq!(TargetWord::decode(word), Ok(t));
        assert_eq!(target::fixed(3, 0x50), 0x0000_0003_0000_8050);
        assert_eq!(TargetWord::decode(0), Ok(TargetWord::default()));
    }

    #[test]
    fn malformed_target_words_are_refused() {
        let good = target::fixed(0, 0x40);
        assert_eq!(
            TargetWord::decode(good | (1 << 14)),
            Err(TargetError::Reserved)
        );
        assert_eq!(
            TargetWord::decode(good | (1 << 31)),
            Err(TargetError::Reserved)
        );
        assert_eq!(
            TargetWord::decode(0x40),
            Err(TargetError::Reserved),
            "bits without present"
        );
        assert_eq!(
            TargetWord::decode(target::fixed(0, 15)),
            Err(TargetError::Vector)
        );
    }

    #[test]
    fn batch_entries_have_the_documented_layout() {
        let e = BatchEntry {
            index: 0x0102_0304,
            status: 9,
            target: target::fixed(1, 0x30),
        };
        let b = e.to_bytes();
        assert_eq!(&b[..4], &[4, 3, 2, 1]);
        assert_eq!(b[4], 9);
        assert_eq!(BatchEntry::from_bytes(&b), e);
        assert_eq!(core::mem::size_of_val(&b) as u64, batch::ENTRY_SIZE);
    }
}
