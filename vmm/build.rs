//! Builds the test guest (`resources/guest`) from source and hands its ELF to the crate,
//! which embeds it as the built-in default image of `vmm run`.
//!
//! The guest is a workspace member, built here by a nested cargo with its own target
//! directory: the bare-metal code generation flags (no red zone, static relocation model)
//! apply to it alone, and its `guest` profile is always optimised, because every ring-0
//! guest instruction may be emulated by the nested KVM of the test machines.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("vmm sits in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("guest-target");

    for path in [
        "resources/guest/src",
        "resources/guest/Cargo.toml",
        "resources/guest/build.rs",
        "resources/guest/linker.ld",
        "hypercall/src",
        "hypercall/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .args([
            "build",
            "--package",
            "test-guest",
            "--features",
            "image",
            "--profile",
            "guest",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"));
    // The outer build's flags and wrappers (clippy, coverage, sanitizers) are for the host
    // crates, not for the freestanding guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        build.env_remove(var);
    }
    build.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cno-redzone=yes\u{1f}-Crelocation-model=static",
    );
    let status = build
        .status()
        .expect("could not run cargo to build the test guest");
    assert!(
        status.success(),
        "building the test guest (resources/guest) failed"
    );

    let elf = target_dir.join("guest").join("test-guest");
    check_emulable(&elf);
    println!("cargo:rustc-env=VMM_TEST_GUEST_ELF={}", elf.display());
}

/// Instructions that KVM's instruction emulator does not implement. On the nested KVM of
/// the test machines every ring-0 guest instruction is emulated, so one of these hangs
/// the guest with "KVM could not emulate an instruction". The compiler emits them for
/// zeroing (arrays and structs built on the stack); restructure the code it points at.
const NOT_EMULATED: [&str; 3] = ["xorps", "xorpd", "pxor"];

/// Fails the build if the guest contains an instruction from [`NOT_EMULATED`] (when
/// `objdump` is there to look; otherwise says that it could not look).
fn check_emulable(elf: &std::path::Path) {
    let Ok(out) = Command::new("objdump")
        .args(["-d", "-M", "intel", "--no-show-raw-insn"])
        .arg(elf)
        .output()
    else {
        println!("cargo:warning=objdump not found: the test guest was not checked for instructions KVM cannot emulate");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut function = "";
    for line in text.lines() {
        if line.ends_with(">:") {
            function = line;
        }
        if let Some(bad) = NOT_EMULATED
            .iter()
            .find(|m| line.split_whitespace().nth(1) == Some(**m))
        {
            panic!(
                "the test guest contains `{bad}`, which KVM's instruction emulator cannot run \
                 (every ring-0 instruction is emulated on the nested test machines): {function} {line}"
            );
        }
    }
}
