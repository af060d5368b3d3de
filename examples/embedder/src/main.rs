//! `cargo run -p embedder-example [COUNT]`: boots the example's guest and prints what each
//! source delivered.

fn main() {
    let count = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    match embedder_example::run(count) {
        Ok(r) if r.guest_status == 0 && r.ims == count && r.msix == count => {
            println!(
                "embedder: PASS: {} IMS and {} MSI-X interrupts counted by the guest (VT-d version {:#x}); hypercalls: {}",
                r.ims,
                r.msix,
                r.vtd_version,
                r.hypercalls
                    .calls
                    .iter()
                    .map(|c| format!("{} {}", c.name, c.calls))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(r) => {
            eprintln!("embedder: FAIL: {r:?}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("embedder: error: {e}");
            std::process::exit(125);
        }
    }
}
