//! The `faults` scenario: the host makes the interrupt core's next KVM call fail
//! (`INJECT`), and the guest checks that the hypercall that needed it reports the failure
//! and that the entry keeps delivering where it did before.

use hypercall::abi::{call, features, status, target, MINOR_VERSION};
use hypercall::harness::{request, status as host_status, HARNESS_SOURCE_ID};

use crate::hc::Guest;
use crate::scenario::{expect, harness_request};
use crate::{count, println};

const BEFORE: u8 = 0x6a;
const AFTER: u8 = 0x6b;
/// Targets the retries of HOST_ERROR move the entry to (each new: a new route).
const RETRY_A: u8 = 0x6d;
const RETRY_B: u8 = 0x6e;
const ME: u64 = HARNESS_SOURCE_ID as u64;

/// Raises entry `index` once through the harness; true if it arrived on vCPU 0 with
/// `vector`.
fn arrives(index: u64, vector: u8) -> bool {
    let start = count(0, vector);
    let (host, delivered) = harness_request(request::RAISE, 0, 1, index as u32);
    expect(0, vector, 1);
    host == host_status::OK && delivered == 1 && count(0, vector) == start + 1
}

fn check(ok: &mut bool, what: &str, good: bool) {
    if !good {
        println!("faults: FAIL: {}", what);
        *ok = false;
    }
}

/// Runs the scenario; `apic0` is vCPU 0's APIC ID.
pub fn run(apic0: u32) -> bool {
    let Some(iface) = crate::hc::discover() else {
        println!("faults: FAIL: no hypercall interface");
        return false;
    };
    let mut hc = Guest::new(iface.port);
    let mut ok = true;
    // Entry e moves; entry e + 1 (never raised) keeps the old target's route, so that
    // moving e needs a new route and a new line.
    let r = hc.call(call::ALLOCATE, ME, 2, 0);
    if r.rax != status::OK {
        println!("faults: FAIL: allocate: status {}", r.rax);
        return false;
    }
    let e = r.rsi;
    let r = hc.call(call::UPDATE, ME, e, target::fixed(apic0, BEFORE));
    check(&mut ok, "first activation", r.rax == status::OK);
    let r = hc.call(call::UPDATE, ME, e + 1, target::fixed(apic0, BEFORE));
    check(&mut ok, "the anchor's activation", r.rax == status::OK);
    check(&mut ok, "delivery before any fault", arrives(e, BEFORE));

    // The retarget to a new target needs a route commit, then an irqfd registration. As
    // an ABI 1.0 driver, a failure is NO_SPACE; once the driver accepts ABI 1.1's
    // HOST_ERROR it is that, and the driver acts on it: it retries, and the retry works.
    let mut at = BEFORE;
    // Each retried move goes to a target nothing used before, so it needs a new route.
    let mut fresh = [RETRY_A, RETRY_B].into_iter();
    for accept in [false, true] {
        if accept {
            check(
                &mut ok,
                "CPUID offers HOST_ERROR",
                iface.features & features::HOST_ERROR != 0,
            );
            let r = hc.call(call::SET_FEATURES, ME, u64::from(features::HOST_ERROR), 0);
            check(
                &mut ok,
                "accepting HOST_ERROR (ABI 1.1)",
                r.rax == status::OK
                    && r.rsi == u64::from(features::HOST_ERROR)
                    && r.rdi == u64::from(MINOR_VERSION),
            );
        }
        let (want, name) = if accept {
            (status::HOST_ERROR, "HOST_ERROR")
        } else {
            (status::NO_SPACE, "NO_SPACE")
        };
        // After its retry the entry is alone on its route, and its next move rewrites that
        // route in place (a commit, no new irqfd): so the 1.1 pass fails the irqfd first.
        let modes = if accept {
            [(2, "irqfd registration"), (1, "route commit")]
        } else {
            [(1, "route commit"), (2, "irqfd registration")]
        };
        for (mode, what) in modes {
            let next = if accept {
                fresh.next().unwrap_or(AFTER)
            } else {
                AFTER
            };
            let (host, _) = harness_request(request::INJECT, 0, 1, mode);
            check(&mut ok, "arming the fault", host == host_status::OK);
            let r = hc.call(call::UPDATE, ME, e, target::fixed(apic0, next));
            if r.rax == want {
                println!(
                    "faults: a failed {} is reported to the guest ({})",
                    what, name
                );
            } else {
                println!("faults: FAIL: a failed {}: status {}", what, r.rax);
                ok = false;
            }
            check(
                &mut ok,
                "the entry still delivers to its old target",
                arrives(e, at),
            );
            if status::retryable(r.rax) {
                let again = hc.call(call::UPDATE, ME, e, target::fixed(apic0, next));
                check(
                    &mut ok,
                    "the retry HOST_ERROR invites",
                    again.rax == status::OK,
                );
                check(&mut ok, "delivery after the retry", arrives(e, next));
                at = next;
            }
        }
    }
    let r = hc.call(call::UPDATE, ME, e, target::fixed(apic0, AFTER));
    check(
        &mut ok,
        "the retarget once KVM works again",
        r.rax == status::OK,
    );
    check(&mut ok, "delivery to the new target", arrives(e, AFTER));
    let r = hc.call(call::FREE, ME, e, 2);
    check(&mut ok, "free", r.rax == status::OK);
    if ok {
        println!("faults: each injected failure left the entry delivering as before");
    }
    ok
}
