//! `vmm`: see `vmm --help`.

use std::error::Error;
use std::process::ExitCode;

use clap::Parser;
use vmm::cli::{ApiArgs, BenchArgs, Cli, Command, DeviceArgs, RestoreArgs, RunArgs};
use vmm::report::EXIT_VMM_ERROR;

/// Prints an error and its causes on one line.
fn report_error(error: &dyn Error) {
    eprintln!("error: {}", vmm::report::error_chain(error));
}

/// Prints a line on stdout; a closed stdout (a pipe into `head`) is not an error.
fn out(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// When `main` began: the process's start, as near as the program can tell (after `exec`
/// and the dynamic loader).
static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn run(args: &RunArgs) -> ExitCode {
    // This thread supervises the VM and then only reports: it runs filtered too.
    vmm::seccomp::confine_main_thread();
    let config = match args.settings().and_then(vmm::Settings::resolve) {
        Ok(config) => config,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    finish(vmm::run(&config))
}

fn restore(args: &RestoreArgs) -> ExitCode {
    vmm::seccomp::confine_main_thread();
    finish(vmm::restore(&args.file, &args.settings()))
}

/// Prints the report (or the error) and gives the exit status.
fn finish(result: Result<vmm::RunReport, vmm::VmError>) -> ExitCode {
    match result {
        Ok(mut report) => {
            if let (Some(start), Some(entry)) = (PROCESS_START.get(), report.first_entry) {
                report.process_startup = Some(entry.saturating_duration_since(*start));
            }
            out(format_args!("{report}"));
            if let Some(failure) = report.failure() {
                eprintln!("error: {failure}");
            }
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            report_error(&e);
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn main() -> ExitCode {
    PROCESS_START.get_or_init(std::time::Instant::now);
    // The libraries log through the `log` facade; RUST_LOG picks what reaches stderr.
    // Unset: errors only, and not virtio-queue's, which are all about queues a guest set
    // up wrongly (the device reports those itself). `RUST_LOG=warn` shows faults, storms,
    // throttling, refused commits and device resets, each call site at most 10 a second.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("error,virtio_queue=off"),
    )
    .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Run(args) => run(args),
        Command::Bench(args) => bench(args),
        Command::Restore(args) => restore(args),
        Command::Device(args) => device(args),
        Command::Api(args) => api(args),
    }
}

fn api(args: &ApiArgs) -> ExitCode {
    let method = args
        .method
        .clone()
        .unwrap_or_else(|| if args.json.is_some() { "PUT" } else { "GET" }.into());
    match vmm::api::client::request(&args.socket, &method, &args.path, args.json.as_deref()) {
        Ok((status, body)) => {
            if !body.is_empty() {
                use std::io::Write;
                let _ = std::io::stdout().lock().write_all(body.as_bytes());
            }
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("error: HTTP {status}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: cannot reach {}: {e}", args.socket.display());
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn device(args: &DeviceArgs) -> ExitCode {
    let (kind, serve) = args.kind.device();
    let max = serve.max_vectors.map(|n| n as usize);
    match vmm::vfio_user::server::serve_kind(&kind, &serve.socket, max) {
        Ok(report) => {
            out(format_args!(
                "{}: {} interrupts raised, {} without a host interrupt, {} hand-overs refused, {} entries held at the end",
                serve.socket.display(),
                report.raised,
                report.unbacked,
                report.refused,
                report.held
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report_error(&e);
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}

fn bench(args: &BenchArgs) -> ExitCode {
    let config = vmm::bench::BenchConfig {
        kvm_device: args.kvm_device.clone(),
        samples: args.samples as usize,
        interrupts: args.interrupts,
        live: args.live,
        vmm_binary: std::env::current_exe().ok(),
    };
    let report = match vmm::bench::run(&config) {
        Ok(report) => report,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(EXIT_VMM_ERROR);
        }
    };
    out(format_args!("{report}"));
    if let Err(e) = std::fs::write(&args.json, report.to_json()) {
        eprintln!("error: cannot write {}: {e}", args.json.display());
        return ExitCode::from(EXIT_VMM_ERROR);
    }
    out(format_args!("figures written to {}", args.json.display()));
    ExitCode::SUCCESS
}
