//! Plain MSI routes (`FIRE_MSI_EACH_CPU`): a route per vCPU, staged and committed as the
//! harness's own route owner beside the interrupt core (`irq::control::RouteControl`), an
//! eventfd attached to each, fired, then detached and removed in the kernel's order.

use irq::control::{InterruptControl, RouteChange};

use super::*;

impl Harness {
    pub(super) fn fire_each_cpu(&self, vector: u8, count: u32, fired: &mut [u32]) -> u32 {
        let targets: Vec<(u32, u8)> = self.apic_ids.iter().map(|&a| (a, vector)).collect();
        let Ok(lines) = self.attach(&targets) else {
            return status::HOST_ERROR;
        };
        let mut result = status::OK;
        'cpus: for (cpu, (_, fd)) in lines.iter().enumerate() {
            let start = self.counter(cpu, vector);
            for k in 1..=count {
                if fd.write(1).is_err() {
                    result = status::HOST_ERROR;
                    break 'cpus;
                }
                self.count_fired(cpu, fired);
                if !self.wait_for(|| self.counter(cpu, vector).wrapping_sub(start) >= k) {
                    result = status::NOT_DELIVERED;
                    break 'cpus;
                }
            }
        }
        if self.detach(lines).is_err() && result == status::OK {
            result = status::HOST_ERROR;
        }
        result
    }

    /// One plain MSI route and one irqfd per (APIC ID, vector), committed together as the
    /// harness's route owner.
    pub(super) fn attach(&self, targets: &[(u32, u8)]) -> Result<Vec<(Gsi, EventFd)>, ()> {
        let routes = self.backing.routes();
        let changes = targets
            .iter()
            .map(|&(apic, vector)| MsiMessage::compatibility(apic, vector).map(RouteChange::Add))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ())?;
        let gsis = routes.stage(self.routes, &changes).map_err(|_| ())?;
        routes.commit(self.routes).map_err(|_| ())?;
        let mut lines = Vec::with_capacity(gsis.len());
        for gsi in gsis.iter().copied() {
            let attached = EventFd::new(EFD_NONBLOCK).map_err(|_| ()).and_then(|fd| {
                routes
                    .attach_irqfd(self.routes, gsi, &fd)
                    .map(|()| fd)
                    .map_err(|_| ())
            });
            match attached {
                Ok(fd) => lines.push((gsi, fd)),
                Err(()) => {
                    let _ = self.detach(lines);
                    // Routes without irqfds (the rest of `gsis`) go too.
                    let removals: Vec<RouteChange> =
                        gsis.iter().map(|&g| RouteChange::Remove(g)).collect();
                    if routes.stage(self.routes, &removals).is_ok() {
                        let _ = routes.commit(self.routes);
                    }
                    return Err(());
                }
            }
        }
        Ok(lines)
    }

    /// Detaches every irqfd, then removes the routes in one commit.
    pub(super) fn detach(&self, lines: Vec<(Gsi, EventFd)>) -> Result<(), ()> {
        let routes = self.backing.routes();
        let mut ok = true;
        for (gsi, fd) in &lines {
            ok &= routes.detach_irqfd(self.routes, *gsi, fd).is_ok();
        }
        let removals: Vec<RouteChange> =
            lines.iter().map(|(g, _)| RouteChange::Remove(*g)).collect();
        ok &= routes.stage(self.routes, &removals).is_ok();
        ok &= routes.commit(self.routes).is_ok();
        ok.then_some(()).ok_or(())
    }
}
