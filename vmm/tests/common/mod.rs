//! What the tests of the `vmm` binary share: running it, reading its output, and a
//! scratch directory per test process.

#![allow(dead_code, reason = "each test binary uses some of these")]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `vmm` with `args` and the default log filter, whatever the caller's environment
/// says.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the vmm binary runs")
}

/// Output bytes as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a failure with exactly one stderr line containing `message`.
pub fn fails_with(args: &[&str], code: i32, message: &str) {
    let out = vmm(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(message),
        "{args:?}: expected {message:?} in {stderr}"
    );
}

/// A path in this test process's scratch directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}
