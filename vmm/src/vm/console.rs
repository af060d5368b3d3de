//! The console a run writes to: a captured buffer for library callers and tests, and a
//! watch that stops the run when the console shows some text (`--until`).

use super::*;

/// A console that keeps what the guest printed, for callers that want it afterwards (or
/// from another thread).
#[derive(Debug, Clone, Default)]
pub struct CapturedConsole(Arc<Mutex<Vec<u8>>>);

impl CapturedConsole {
    /// Everything written so far, as text.
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for CapturedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A console that passes everything on and tells the controller, once, when the output
/// shows `pattern` (`--until`).
pub(super) struct ConsoleWatch {
    inner: Box<dyn Write + Send>,
    pattern: Vec<u8>,
    /// The last bytes seen, for a pattern split over writes.
    tail: Vec<u8>,
    events: Option<Sender<VmEvent>>,
}

impl ConsoleWatch {
    pub(super) fn new(
        inner: Box<dyn Write + Send>,
        pattern: &str,
        events: Sender<VmEvent>,
    ) -> Self {
        Self {
            inner,
            pattern: pattern.as_bytes().to_vec(),
            tail: Vec::new(),
            events: Some(events),
        }
    }
}

impl Write for ConsoleWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if self.events.is_some() && !self.pattern.is_empty() {
            self.tail
                .extend_from_slice(buf.get(..n).unwrap_or_default());
            if self
                .tail
                .windows(self.pattern.len())
                .any(|w| w == self.pattern.as_slice())
            {
                if let Some(events) = self.events.take() {
                    let _ = events.send(VmEvent::ConsoleMatched);
                }
            }
            let keep = self.pattern.len().saturating_sub(1);
            let cut = self.tail.len().saturating_sub(keep);
            self.tail.drain(..cut);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens the console a configuration names.
pub(super) fn open_console(console: &Console) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match console {
        Console::Stdout => Box::new(io::stdout()),
        Console::Off => Box::new(io::sink()),
        Console::File(path) => Box::new(BufWriter::new(File::create(path).map_err(|source| {
            VmError::ConsoleFile {
                path: path.clone(),
                source,
            }
        })?)),
    })
}

/// Reports the guest's verdict to the controller.
#[derive(Debug)]
pub(super) struct ExitEvents(pub(super) Sender<VmEvent>);

impl ExitSink for ExitEvents {
    fn guest_exit(&self, code: u32) {
        let _ = self.0.send(VmEvent::GuestExit(code));
    }
}
