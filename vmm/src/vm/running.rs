//! A running VM: its threads started, supervised (verdict, vCPUs stopping, watchdog,
//! snapshot), stopped on time, and its report read back.

use super::*;

impl Vm<'_> {
    /// Runs the VM until its verdict, every vCPU stopping or the watchdog (taking the
    /// snapshot the run asks for on the way), stops every thread on time, and reports.
    pub(super) fn run(
        mut self,
        events: &mpsc::Receiver<VmEvent>,
        started: Instant,
    ) -> Result<RunReport, VmError> {
        let config = self.config;
        let storm_ticker = spawn_storm_ticker(
            &self.path,
            config.machine.irq_rate,
            self.stop.clone(),
            self.storm_gate.clone(),
        )
        .map_err(|e| VmError::Os("start the storm ticker", e))?;
        let mut spawn_error = None;
        for (index, vcpu) in (0..).zip(std::mem::take(&mut self.vcpus)) {
            match vcpu::spawn(vcpu, index, self.shared.clone()) {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    spawn_error = Some(VmError::Os("start a vCPU thread", e));
                    break;
                }
            }
        }
        let outcome = match spawn_error {
            None => self.supervise(events),
            Some(_) => Outcome::VcpusStopped {
                stopped: Vec::new(),
            },
        };

        self.stop.store(true, Ordering::Release);
        // Every thread gets until the same moment to leave: one inside a device call (a
        // device the guest keeps busy) is left to finish on its own, so the run ends on
        // time, the watchdog's included.
        let deadline = Instant::now() + STOP_GRACE;
        let stuck_vcpus = stop_vcpus(std::mem::take(&mut self.threads), deadline);
        if let Some(t) = self.harness.thread.take() {
            let _ = join_by(t, deadline);
        }
        if let Some(t) = storm_ticker {
            let _ = join_by(t, deadline);
        }
        let devices = self.pci.finish(deadline);
        if let Some(e) = spawn_error {
            return Err(e);
        }
        let measurements = self
            .harness
            .measurements
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let remap_stats = self.backing.lock().stats();
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        let flush_failed = u64::from(serial.flush().is_err());
        let counters = &self.shared.counters;
        Ok(RunReport {
            kernel: config.machine.kernel.clone(),
            cpus: config.machine.cpus,
            memory: config.machine.memory,
            outcome,
            restored_from: self.restored_from.clone(),
            snapshot: self.taken.take(),
            interrupts: config
                .machine
                .harness
                .then(|| guest_counts(&self.mem, &self.placement, config.machine.cpus))
                .flatten(),
            harness_fired: self
                .harness
                .fired
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
            remap_faults: remap_faults(&self.backing),
            dma_faults: self
                .vtd
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .dma()
                .faults_by_reason(),
            remap_stats,
            hypercalls: self.dispatcher.stats(),
            storms: self.path.storm_stats(),
            devices,
            measurements,
            stuck_vcpus,
            unmapped_accesses: counters.unmapped_pio.load(Ordering::Relaxed)
                + counters.unmapped_mmio.load(Ordering::Relaxed),
            completed_instructions: self.shared.completions.counts(),
            console_errors: serial.errors() + flush_failed,
            elapsed: started.elapsed(),
        })
    }
}

impl Vm<'_> {
    /// Waits for a verdict, for every vCPU to stop, or for the watchdog; takes the
    /// snapshot when it is due.
    fn supervise(&mut self, events: &mpsc::Receiver<VmEvent>) -> Outcome {
        let config = self.config;
        let begin = Instant::now();
        let deadline = config.run.watchdog.map(|w| begin + w);
        let mut snapshot_at = config
            .run
            .snapshot
            .as_ref()
            .and_then(|p| p.after)
            .map(|a| begin + a);
        let mut stopped: Vec<(u32, StopReason)> = Vec::new();
        loop {
            let wake = match (deadline, snapshot_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = match wake {
                Some(d) => events.recv_timeout(d.saturating_duration_since(Instant::now())),
                None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let snapshot_due = match &event {
                Ok(VmEvent::SnapshotRequested) => true,
                Err(RecvTimeoutError::Timeout) => {
                    snapshot_at.is_some_and(|at| Instant::now() >= at)
                }
                _ => false,
            };
            if snapshot_due {
                snapshot_at = None;
                let Some(plan) = config.run.snapshot.as_ref() else {
                    continue;
                };
                if self.taken.is_some() {
                    // One snapshot per run; a second request is answered but not taken.
                    continue;
                }
                match self.snapshot(plan) {
                    Ok(()) if plan.then == AfterSnapshot::Stop => {
                        return Outcome::Snapshotted {
                            path: plan.path.clone(),
                        }
                    }
                    Ok(()) => continue,
                    Err(e) => {
                        return Outcome::SnapshotFailed {
                            error: crate::report::error_chain(&e),
                        }
                    }
                }
            }
            match event {
                Ok(VmEvent::GuestExit(code)) => return Outcome::GuestExit { code },
                Ok(VmEvent::ConsoleMatched) => {
                    return Outcome::ConsoleMatched {
                        text: config.run.until.clone().unwrap_or_default(),
                    }
                }
                Ok(VmEvent::VcpuStopped { index, reason }) => {
                    if reason.is_failure() {
                        return Outcome::VcpuFailed { index, reason };
                    }
                    if !stopped.iter().any(|(i, _)| *i == index) {
                        stopped.push((index, reason));
                    }
                    if stopped.len() == config.machine.cpus as usize {
                        return Outcome::VcpusStopped { stopped };
                    }
                }
                Ok(VmEvent::SnapshotRequested) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        let after = config.run.watchdog.unwrap_or_default();
                        return Outcome::Watchdog { after, stopped };
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Outcome::VcpusStopped { stopped },
            }
        }
    }

    /// Pauses the VM, writes its snapshot to `plan.path`, and (to go on) resumes it.
    fn snapshot(&mut self, plan: &SnapshotPlan) -> Result<(), VmError> {
        let began = Instant::now();
        // The harness between requests, the devices' loop and storm control stopped,
        // then the vCPUs out of KVM_RUN with nothing pending.
        let harness_idle = self.harness.idle.clone();
        let _harness = harness_idle.lock().unwrap_or_else(PoisonError::into_inner);
        let storm_gate = self.storm_gate.clone();
        let _storms = storm_gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.pci.pause();
        // Interrupts storm control holds back go to the LAPICs, where the snapshot
        // finds them.
        self.path.flush_throttled();
        self.shared.pause.store(true, Ordering::Release);
        let vcpus = pause_vcpus(std::mem::take(&mut self.threads));
        self.shared.pause.store(false, Ordering::Release);
        let paused = began.elapsed();
        let written = self.capture(&vcpus).and_then(|snap| {
            snapshot::write(&plan.path, &snap, &self.mem, self.config.machine.memory)
                .map_err(VmError::from)
        });
        let bytes = written?;
        self.taken = Some(SnapshotTaken {
            path: plan.path.clone(),
            bytes,
            pause: began.elapsed(),
            pausing: paused,
        });
        if plan.then == AfterSnapshot::Continue {
            self.pci
                .resume()
                .map_err(|e| VmError::Os("resume the PCI devices", e))?;
            for (index, vcpu) in (0..).zip(vcpus) {
                let handle = vcpu::spawn(vcpu, index, self.shared.clone())
                    .map_err(|e| VmError::Os("resume a vCPU thread", e))?;
                self.threads.push(handle);
            }
        }
        Ok(())
    }

    /// The paused VM's state (everything but RAM, which [`snapshot::write`] adds).
    fn capture(&self, vcpus: &[VcpuFd]) -> Result<VmSnapshot, VmError> {
        let states = (0..)
            .zip(vcpus)
            .map(|(index, vcpu)| snapshot::capture_vcpu(vcpu, index, &self.msr_list))
            .collect::<Result<Vec<_>, _>>()?;
        if states.len() != self.config.machine.cpus as usize {
            return Err(SnapshotError::Invalid("a vCPU thread was lost".into()).into());
        }
        Ok(VmSnapshot {
            machine: self.config.machine.settings(),
            image_end: self.image_end,
            vm: snapshot::capture_vm(
                &self.vm,
                self.ioapic
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .snapshot(),
            )?,
            vcpus: states,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(),
            interrupts: self.backing.lock().snapshot(),
            vtd: self
                .vtd
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(),
            pci: self.pci.snapshot()?,
        })
    }
}
