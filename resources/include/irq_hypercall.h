/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The IRTE hypercall ABI, version 1.1, for guest kernels written in C.
 *
 * The contract is docs/hypercall.md; the Rust definitions are the `hypercall` crate
 * (hypercall/src/abi.rs). A test (hypercall/tests/c_header.rs) keeps every value below
 * identical to the Rust ones.
 *
 * Call: EAX = call number, RCX = requester ID (the whole register), RSI/RDI/R8 =
 * arguments; then `outl %eax, %dx` with DX = IRQ_HC_PORT (from CPUID). RAX = status; RSI,
 * RDI, R8, R9 = results. Other registers are preserved. A call that fails changes nothing
 * but RAX, except that a BATCH refused after its array was read writes each entry's status
 * and RSI = 0. Only a 4-byte `out` is a call: `outb`/`outw` are answered
 * IRQ_HC_UNSUPPORTED in RAX and change nothing else; an `in` from the port reads all ones.
 */
#ifndef IRQ_HYPERCALL_H
#define IRQ_HYPERCALL_H

#include <stdint.h>

/* Discovery: CPUID leaves. */
#define IRQ_HC_CPUID_BASE             0x40000100u /* EAX max leaf, EBX:ECX:EDX signature */
#define IRQ_HC_CPUID_INTERFACE        0x40000101u /* EAX version, EBX features, ECX port, EDX table size */
#define IRQ_HC_SIGNATURE_EBX          0x52515249u /* "IRQR" */
#define IRQ_HC_SIGNATURE_ECX          0x50414d45u /* "EMAP" */
#define IRQ_HC_SIGNATURE_EDX          0x56505948u /* "HYPV" */
#define IRQ_HC_ABI_VERSION            1u
#define IRQ_HC_ABI_MINOR_VERSION      1u  /* reported by IRQ_HC_SET_FEATURES */
#define IRQ_HC_PORT                   0x510u

/* Feature bits (EBX of IRQ_HC_CPUID_INTERFACE). */
#define IRQ_HC_FEATURE_BATCH          (1u << 0)
#define IRQ_HC_FEATURE_MANAGED        (1u << 1)
#define IRQ_HC_FEATURE_COMPOSE        (1u << 2)
#define IRQ_HC_FEATURE_X2APIC_DEST    (1u << 3)
#define IRQ_HC_FEATURE_HOST_ERROR     (1u << 4) /* 1.1: IRQ_HC_SET_FEATURES, IRQ_HC_HOST_ERROR */
#define IRQ_HC_FEATURES_NEGOTIABLE    IRQ_HC_FEATURE_HOST_ERROR

/* Call numbers (EAX). */
#define IRQ_HC_QUERY                  0u
#define IRQ_HC_ALLOCATE               1u
#define IRQ_HC_UPDATE                 2u
#define IRQ_HC_FREE                   3u
#define IRQ_HC_BATCH                  4u
#define IRQ_HC_COMPOSE                5u
#define IRQ_HC_SET_FEATURES           6u  /* RSI: features accepted; out RSI in force, RDI minor */

/* Status codes (RAX). */
#define IRQ_HC_OK                     0u
#define IRQ_HC_INVALID_ARGUMENT       1u
#define IRQ_HC_NO_SPACE               2u
#define IRQ_HC_QUOTA_EXCEEDED         3u
#define IRQ_HC_BUSY                   4u
#define IRQ_HC_SOURCE_ID_NOT_PERMITTED 5u
#define IRQ_HC_NOT_ALLOCATED          6u
#define IRQ_HC_BAD_GUEST_ADDRESS      7u
#define IRQ_HC_UNSUPPORTED            8u
#define IRQ_HC_NOT_APPLIED            9u
#define IRQ_HC_HOST_ERROR             10u /* only after IRQ_HC_FEATURE_HOST_ERROR is accepted */

/* Statuses worth repeating the same call for (the others need a change first). */
#define IRQ_HC_RETRYABLE(status)      ((status) == IRQ_HC_BUSY || (status) == IRQ_HC_HOST_ERROR)

/* Allocation flags (RDI of IRQ_HC_ALLOCATE). */
#define IRQ_HC_ALLOC_MANAGED          (1u << 0)
#define IRQ_HC_ALLOC_ALIGNED          (1u << 1)

/* The target word of an update (RDI of IRQ_HC_UPDATE, `target` of a batch entry). */
#define IRQ_HC_TARGET_VECTOR          0xffull
#define IRQ_HC_TARGET_DELIVERY_SHIFT  8u
#define IRQ_HC_TARGET_DELIVERY_MASK   7ull
#define IRQ_HC_TARGET_LEVEL           (1ull << 11)
#define IRQ_HC_TARGET_LOGICAL         (1ull << 12)
#define IRQ_HC_TARGET_REDIRECTION_HINT (1ull << 13)
#define IRQ_HC_TARGET_PRESENT         (1ull << 15)
#define IRQ_HC_TARGET_DEST_SHIFT      32u
#define IRQ_HC_TARGET_RESERVED        0xffff4000ull
#define IRQ_HC_TARGET_MIN_VECTOR      16u

/* Batch array (RSI = guest-physical address, RDI = count). */
#define IRQ_HC_BATCH_ENTRY_SIZE       16u
#define IRQ_HC_BATCH_ALIGN            16u
#define IRQ_HC_BATCH_MAX_ENTRIES      4096u

struct irq_hc_batch_entry {
	uint32_t index;   /* entry to update */
	uint32_t status;  /* written by the host */
	uint64_t target;  /* target word */
};

#endif /* IRQ_HYPERCALL_H */
