//! A running VM: its threads started, supervised (verdict, vCPUs stopping, watchdog,
//! snapshot), stopped on time, and its report read back.

use super::*;
use crate::api::http::Refusal;
use crate::api::{ApiCall, ApiRequest, Body};

/// Where the VM stands after a control-API request.
enum Action {
    /// Running, as before.
    Running,
    /// Paused, then resumed: how long it was paused and the events held meanwhile.
    Resumed {
        paused_for: Duration,
        held: Vec<VmEvent>,
    },
    /// The run ends.
    Ended(Outcome),
}

/// Filters the thread running the VM, if the program asked for it
/// ([`crate::seccomp::confine_main_thread`]); the error if that failed.
fn confine_main(mode: crate::seccomp::SeccompMode) -> Option<VmError> {
    if !crate::seccomp::main_thread_confined() {
        return None;
    }
    crate::seccomp::install(crate::seccomp::ThreadKind::Main, mode)
        .err()
        .map(|e| VmError::Os("filter the main thread", std::io::Error::other(e)))
}

/// A snapshot the API asked for that failed, as the client sees it.
fn snapshot_refusal(e: &VmError) -> Refusal {
    let status = match e {
        VmError::Pci(crate::pci::PciError::NotSnapshottable(_)) => 409,
        VmError::Snapshot(SnapshotError::Write { .. }) => 400,
        _ => 500,
    };
    Refusal::new(status, crate::report::error_chain(e))
}

impl Vm<'_> {
    /// Stops every thread of the VM, each woken to see the stop (none waits out a poll
    /// period): the vCPUs that stayed inside a device call, the other threads that had
    /// not ended by the grace's end, and the devices' reports.
    fn stop_threads(
        &mut self,
        storm_stop: &crate::threads::StopSignal,
        storm_ticker: Option<JoinHandle<()>>,
    ) -> (u32, Vec<String>, Vec<crate::pci::DeviceReport>) {
        self.stop.store(true, Ordering::Release);
        storm_stop.stop();
        if let Some(wake) = &self.harness.wake {
            // Full: a ring is waiting, which wakes the harness as well.
            let _ = wake.try_send(());
        }
        // Every thread gets until the same moment to leave: one inside a device call (a
        // device the guest keeps busy) is left to finish on its own, so the run ends on
        // time, the watchdog's included.
        let deadline = Instant::now() + STOP_GRACE;
        let stuck_vcpus = stop_vcpus(std::mem::take(&mut self.threads), deadline);
        let mut left = Vec::new();
        if let Some(t) = self.harness.thread.take() {
            if join_by(t, deadline).is_none() {
                left.push("harness".to_string());
            }
        }
        if let Some(t) = storm_ticker {
            if join_by(t, deadline).is_none() {
                left.push("irq-storms".to_string());
            }
        }
        let devices = self.pci.finish(deadline);
        if self.pci.loop_left_running() {
            left.push("ims-devices".to_string());
        }
        (stuck_vcpus, left, devices)
    }

    /// Runs the VM until its verdict, every vCPU stopping or the watchdog (taking the
    /// snapshot the run asks for on the way), stops every thread on time, and reports.
    pub(super) fn run(
        mut self,
        events: &mpsc::Receiver<VmEvent>,
        started: Instant,
    ) -> Result<RunReport, VmError> {
        let config = self.config;
        let mut api = match &config.run.api_socket {
            Some(path) => Some(crate::api::ApiServer::start(
                path,
                self.shared.events.clone(),
            )?),
            None => None,
        };
        let storm_stop = Arc::new(crate::threads::StopSignal::default());
        let storm_ticker = spawn_storm_ticker(
            &self.path,
            config.machine.irq_rate,
            storm_stop.clone(),
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
        if spawn_error.is_none() {
            // A failure stops the VM (its threads are stopped below) and is the run's error.
            spawn_error = confine_main(config.run.seccomp);
        }
        let outcome = match spawn_error {
            None => self.supervise(events),
            Some(_) => Outcome::VcpusStopped {
                stopped: Vec::new(),
            },
        };
        // No request is taken from here on; its socket goes away.
        if let Some(server) = api.as_mut() {
            server.stop();
        }

        let (stuck_vcpus, threads_left, devices) = self.stop_threads(&storm_stop, storm_ticker);
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
            threads_left,
            unmapped_accesses: counters.unmapped_pio.load(Ordering::Relaxed)
                + counters.unmapped_mmio.load(Ordering::Relaxed),
            completed_instructions: self.shared.completions.counts(),
            console_errors: serial.errors() + flush_failed,
            trace: None,
            elapsed: started.elapsed(),
            first_entry: self.shared.first_entry.get().copied(),
            startup: self
                .shared
                .first_entry
                .get()
                .map(|at| at.saturating_duration_since(started)),
            process_startup: None,
        })
    }
}

impl Vm<'_> {
    /// Waits for a verdict, for every vCPU to stop, or for the watchdog; takes the
    /// snapshot when it is due; answers the control API.
    fn supervise(&mut self, events: &mpsc::Receiver<VmEvent>) -> Outcome {
        let config = self.config;
        let begin = Instant::now();
        let mut deadline = config.run.watchdog.map(|w| begin + w);
        let mut snapshot_at = config
            .run
            .snapshot
            .as_ref()
            .and_then(|p| p.after)
            .map(|a| begin + a);
        let mut stopped: Vec<(u32, StopReason)> = Vec::new();
        let mut planned_taken = false;
        // Events that arrived while the VM was paused, handled once it runs again.
        let mut backlog: std::collections::VecDeque<VmEvent> = std::collections::VecDeque::new();
        loop {
            let wake = match (deadline, snapshot_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let event = match (backlog.pop_front(), wake) {
                (Some(e), _) => Ok(e),
                (None, Some(d)) => events.recv_timeout(d.saturating_duration_since(Instant::now())),
                (None, None) => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
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
                if planned_taken {
                    // One planned snapshot per run; a second request is answered but not
                    // taken (snapshots the control API asks for are its own).
                    continue;
                }
                planned_taken = true;
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
                Ok(VmEvent::Api(call)) => {
                    let run = control::RunState {
                        began: begin,
                        paused: false,
                    };
                    match self.api_action(&call, run, events) {
                        Action::Running => {}
                        Action::Resumed { paused_for, held } => {
                            // The watchdog and a planned snapshot do not count a pause.
                            deadline = deadline.map(|d| d + paused_for);
                            snapshot_at = snapshot_at.map(|d| d + paused_for);
                            backlog.extend(held);
                        }
                        Action::Ended(outcome) => return outcome,
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

    /// Carries out a control-API request on the running VM.
    fn api_action(
        &mut self,
        call: &ApiCall,
        run: control::RunState,
        events: &mpsc::Receiver<VmEvent>,
    ) -> Action {
        match &call.request {
            ApiRequest::Pause => self.paused(call, run, events),
            ApiRequest::Resume => {
                call.answer(Err(Refusal::new(409, "the VM is not paused")));
                Action::Running
            }
            ApiRequest::Shutdown => {
                call.answer(Ok(Body::Empty));
                Action::Ended(Outcome::Shutdown)
            }
            ApiRequest::Snapshot { path } => {
                let plan = SnapshotPlan {
                    path: path.clone(),
                    after: None,
                    then: AfterSnapshot::Continue,
                };
                let result = self.snapshot(&plan);
                match result {
                    Ok(()) => call.answer(Ok(Body::Json(self.snapshot_json()))),
                    Err(VmError::Os(what, e)) => {
                        // The VM could not be resumed: it ends here.
                        let error = format!("cannot {what}: {e}");
                        call.answer(Err(Refusal::new(500, error.clone())));
                        return Action::Ended(Outcome::SnapshotFailed { error });
                    }
                    Err(e) => call.answer(Err(snapshot_refusal(&e))),
                }
                Action::Running
            }
            request => {
                call.answer(self.query(request, run));
                Action::Running
            }
        }
    }

    /// Pauses the VM (answering `call`) and serves the API until a resume or a shutdown.
    fn paused(
        &mut self,
        call: &ApiCall,
        run: control::RunState,
        events: &mpsc::Receiver<VmEvent>,
    ) -> Action {
        let since = Instant::now();
        let harness_idle = self.harness.idle.clone();
        let _harness = harness_idle.lock().unwrap_or_else(PoisonError::into_inner);
        let storm_gate = self.storm_gate.clone();
        let _storms = storm_gate.lock().unwrap_or_else(PoisonError::into_inner);
        let vcpus = self.pause_machine();
        call.answer(Ok(Body::Empty));
        let run = control::RunState {
            paused: true,
            ..run
        };
        let mut held = Vec::new();
        // The vCPU threads' sender lives in `self.shared`: the channel cannot close here.
        while let Ok(event) = events.recv() {
            let VmEvent::Api(call) = event else {
                held.push(event);
                continue;
            };
            match &call.request {
                ApiRequest::Resume => {
                    return match self.resume_machine(vcpus) {
                        Ok(()) => {
                            call.answer(Ok(Body::Empty));
                            Action::Resumed {
                                paused_for: since.elapsed(),
                                held,
                            }
                        }
                        Err(e) => {
                            let error = crate::report::error_chain(&e);
                            call.answer(Err(Refusal::new(500, error.clone())));
                            log::error!("the VM cannot resume: {error}");
                            Action::Ended(Outcome::VcpusStopped {
                                stopped: Vec::new(),
                            })
                        }
                    };
                }
                ApiRequest::Pause => {
                    call.answer(Err(Refusal::new(409, "the VM is paused already")))
                }
                ApiRequest::Shutdown => {
                    call.answer(Ok(Body::Empty));
                    return Action::Ended(Outcome::Shutdown);
                }
                ApiRequest::Snapshot { path } => {
                    // Paused already: the VM waits for the disk too, as it would anyway.
                    let began = Instant::now();
                    let size = self.config.machine.memory;
                    let written = self.capture(&vcpus).and_then(|snap| {
                        Ok(snapshot::write(path, snap, &self.mem, size)?.finish()?)
                    });
                    match written {
                        Ok(bytes) => {
                            self.taken = Some(SnapshotTaken {
                                path: path.clone(),
                                bytes,
                                pause: began.elapsed(),
                                pausing: Duration::ZERO,
                            });
                            call.answer(Ok(Body::Json(self.snapshot_json())));
                        }
                        Err(e) => call.answer(Err(snapshot_refusal(&e))),
                    }
                }
                request => call.answer(self.query(request, run)),
            }
        }
        Action::Ended(Outcome::VcpusStopped {
            stopped: Vec::new(),
        })
    }

    /// The last snapshot taken, for the API's answer.
    fn snapshot_json(&self) -> serde_json::Value {
        match &self.taken {
            Some(t) => serde_json::json!({
                "path": t.path.display().to_string(),
                "bytes": t.bytes,
                "pause_ms": t.pause.as_secs_f64() * 1e3,
            }),
            None => serde_json::Value::Null,
        }
    }

    /// Pauses the VM and, unless the plan stops it, resumes it, with its snapshot written
    /// to `plan.path` in between.
    fn snapshot(&mut self, plan: &SnapshotPlan) -> Result<(), VmError> {
        let began = Instant::now();
        let harness_idle = self.harness.idle.clone();
        let harness_held = harness_idle.lock().unwrap_or_else(PoisonError::into_inner);
        let storm_gate = self.storm_gate.clone();
        let storms_held = storm_gate.lock().unwrap_or_else(PoisonError::into_inner);
        let vcpus = self.pause_machine();
        let paused = began.elapsed();
        let size = self.config.machine.memory;
        let captured = self
            .capture(&vcpus)
            .map(|snap| snapshot::capture(snap, &self.mem, size));
        // A snapshot too large to copy is written now, from the paused RAM.
        let early = match &captured {
            Ok(c) if !c.is_staged() => Some(c.write(&plan.path, &self.mem, size)),
            _ => None,
        };
        // The state and RAM are copied (or in the file): the VM need not wait for the disk.
        let pause = began.elapsed();
        if plan.then == AfterSnapshot::Continue {
            self.resume_machine(vcpus)?;
        }
        drop((harness_held, storms_held));
        let written = match early {
            Some(written) => written?,
            None => captured?.write(&plan.path, &self.mem, size)?,
        };
        let bytes = written.finish()?;
        self.taken = Some(SnapshotTaken {
            path: plan.path.clone(),
            bytes,
            pause,
            pausing: paused,
        });
        Ok(())
    }

    /// Stops the VM's work (the caller holds the harness's and storm control's locks):
    /// the devices' loop, then the vCPUs out of `KVM_RUN` with nothing pending; returns
    /// the vCPUs.
    fn pause_machine(&mut self) -> Vec<VcpuFd> {
        self.pci.pause();
        // Interrupts storm control holds back go to the LAPICs, where a snapshot finds
        // them.
        self.path.flush_throttled();
        self.shared.pause.store(true, Ordering::Release);
        let vcpus = pause_vcpus(std::mem::take(&mut self.threads));
        self.shared.pause.store(false, Ordering::Release);
        vcpus
    }

    /// Starts the devices' loop and the vCPU threads again.
    fn resume_machine(&mut self, vcpus: Vec<VcpuFd>) -> Result<(), VmError> {
        self.pci
            .resume()
            .map_err(|e| VmError::Os("resume the PCI devices", e))?;
        for (index, vcpu) in (0..).zip(vcpus) {
            let handle = vcpu::spawn(vcpu, index, self.shared.clone())
                .map_err(|e| VmError::Os("resume a vCPU thread", e))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// The paused VM's state (everything but RAM, which [`snapshot::capture`] adds).
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
            hypercall_features: self.dispatcher.accepted_features(),
        })
    }
}
