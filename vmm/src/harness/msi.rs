//! Plain MSI routes (`FIRE_MSI_EACH_CPU`): a route per vCPU committed through the route
//! table, an eventfd attached to each, fired, then detached and removed in the kernel's
//! order.

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

    /// One plain MSI route and one irqfd per (APIC ID, vector), committed together.
    pub(super) fn attach(&self, targets: &[(u32, u8)]) -> Result<Vec<(Gsi, EventFd)>, ()> {
        let mut backing = self.backing.lock();
        let routes = backing.routes_mut();
        let mut gsis = Vec::with_capacity(targets.len());
        for &(apic, vector) in targets {
            let allocated = MsiMessage::compatibility(apic, vector)
                .map_err(|_| ())
                .and_then(|msg| routes.allocate(msg).map_err(|_| ()));
            match allocated {
                Ok(gsi) => gsis.push(gsi),
                Err(()) => {
                    routes.rollback();
                    return Err(());
                }
            }
        }
        routes.commit().map_err(|_| ())?;
        let mut lines = Vec::with_capacity(gsis.len());
        for gsi in gsis.iter().copied() {
            let attached = EventFd::new(EFD_NONBLOCK)
                .map_err(|_| ())
                .and_then(|fd| routes.attach_irqfd(&fd, gsi).map(|()| fd).map_err(|_| ()));
            match attached {
                Ok(fd) => lines.push((gsi, fd)),
                Err(()) => {
                    drop(backing);
                    let _ = self.detach(lines);
                    // Routes without irqfds (the rest of `gsis`) go too.
                    let mut backing = self.backing.lock();
                    let routes = backing.routes_mut();
                    for gsi in gsis {
                        let _ = routes.remove(gsi);
                    }
                    let _ = routes.commit();
                    return Err(());
                }
            }
        }
        Ok(lines)
    }

    /// Detaches every irqfd, then removes the routes in one commit.
    pub(super) fn detach(&self, lines: Vec<(Gsi, EventFd)>) -> Result<(), ()> {
        let mut backing = self.backing.lock();
        let routes = backing.routes_mut();
        let mut ok = true;
        for (gsi, fd) in &lines {
            ok &= routes.detach_irqfd(fd, *gsi).is_ok();
        }
        for (gsi, _) in &lines {
            ok &= routes.remove(*gsi).is_ok();
        }
        ok &= routes.commit().is_ok();
        ok.then_some(()).ok_or(())
    }
}
