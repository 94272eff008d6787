//! The built `libnvidia-ml.so.1`, called from C as NVML users call it, over
//! a fake `libcuda.so.1` (`fake_cuda.c`): no GPU and no server needed.
//!
//! Each test compiles the fake and `nvml_check.c` with the system C
//! compiler (`$CC`, default `cc`) into its own folder, links the program
//! against the library cargo built for this package, and runs it with
//! `LD_LIBRARY_PATH` set to that folder only. The folder holds the library
//! under its installed name `libnvidia-ml.so.1` and nothing else of ours,
//! so the run also shows that the soname is right: the program asks the
//! loader for the name recorded at link time, which is the soname.
//!
//! End-to-end runs against gpupool's real libcuda stub and a server live
//! in the workspace's `tests/`.

use anyhow::{Context, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cdylib cargo built for this package. Integration tests run from
/// `<target>/<profile>/deps/`; the library this test depends on is built
/// there (with its rlib, see Cargo.toml), and copied one folder up only by
/// a `cargo build`, so that copy may be stale and is not used.
fn built_library() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test binary has no folder")?;
    let lib = deps.join("libnvidia_ml.so");
    ensure!(lib.is_file(), "{} is missing: cargo builds it before this test", lib.display());
    Ok(lib)
}

fn compiler() -> String {
    std::env::var("CC").ok().filter(|c| !c.trim().is_empty()).unwrap_or_else(|| "cc".into())
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A folder with the fake `libcuda.so.1`, `libnvidia-ml.so.1` and the
/// compiled `nvml_check`.
fn setup(name: &str) -> Result<PathBuf> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("libnvml-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    // A copy, not a link: a rebuild during the run cannot change it.
    std::fs::copy(built_library()?, dir.join("libnvidia-ml.so.1"))?;
    run_checked(
        Command::new(compiler())
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o"])
            .arg(dir.join("libcuda.so.1"))
            .arg(here.join("fake_cuda.c")),
    )?;
    run_checked(
        Command::new(compiler())
            .args(["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(dir.join("nvml_check"))
            .arg(here.join("nvml_check.c"))
            .arg(dir.join("libnvidia-ml.so.1"))
            .arg("-ldl"),
    )?;
    Ok(dir)
}

fn run_check(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut cmd = Command::new(dir.join("nvml_check"));
    cmd.args(args).env("LD_LIBRARY_PATH", dir).env_remove("GPUPOOL_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_checked(&mut cmd)
}

const EXPECTED: &str = "\
init=0 (Success)
init_again=0 (Success)
driver_version=580.159.04
nvml_version=13.580.159.04
cuda_driver_version=13000
cuda_driver_version_v2=13000
count=1
handle_1=2 (Invalid Argument)
name=Fake GPU
uuid=GPU-00010203-0405-0607-0809-0a0b0c0d0e0f
uuid_small_buffer=7 (Insufficient Size)
index=0
minor=0
pci.busId=00000000:1B:00.0
pci.busIdLegacy=0000:1B:00.0
pci.domain=0 bus=27 device=0 pciDeviceId=0x000010de
memory.total=1073741824 free=268435456 used=805306368
memory_v2_unversioned=25 (Argument version mismatch)
memory_v2.total=1073741824 reserved=0 free=268435456 used=805306368
cc=9.0
mig=0/0
is_mig=0
utilization=3 (Not Supported)
processes=0
processes_probe=0
multi_gpu_board=0
brand=0
arch=9
cores=16896
persistence=0
compute_mode=0
by_uuid_same=1
by_uuid_unknown=6 (Not Found)
by_pci_same=1
by_pci_legacy_same=1
by_pci_unknown=6 (Not Found)
forged_handle=2 (Invalid Argument)
null_handle=2 (Invalid Argument)
null_out=2 (Invalid Argument)
temperature=3 (Not Supported)
error_string_999=Unknown Error
error_string_12345=Unknown Error
fake_cuda_outstanding=0
shutdown=0 (Success)
still_open=0 (Success)
shutdown_last=0 (Success)
after_shutdown=1 (Uninitialized)
shutdown_extra=1 (Uninitialized)
reinit=0 (Success)
index_after_reinit=0
shutdown_reinit=0 (Success)
";

#[test]
fn nvml_answers_from_libcuda() -> Result<()> {
    let dir = setup("answers")?;
    let out = run_check(&dir, &[], &[])?;
    let stdout = String::from_utf8(out.stdout)?;
    assert_eq!(stdout, EXPECTED, "stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    // Nothing is worth a warning in a normal run (unsupported calls are
    // logged at info only).
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The server's host, as its NVML saw it: the kernel driver's version and
/// the GPU's PCIe link; and what is reported where the server could not
/// say (the emulated device, or a host without NVML).
#[test]
fn host_figures_come_from_the_server() -> Result<()> {
    let dir = setup("host")?;
    let known = run_check(&dir, &["host"], &[])?;
    assert_eq!(
        String::from_utf8(known.stdout)?,
        "driver_version=580.159.04\nnvml_version=13.580.159.04\npcie_max_generation=5\npcie_max_width=16\n\
         pcie_current_generation=5\npcie_current_width=16\npcie_max_speed=32000\npcie_speed=32000\n\
         pcie_null_out=2 (Invalid Argument)\nfabric_state=0 status=0 clique=0\nfield_91=3 type 0 value 0\nfield_90=3 type 0 value 0\n\
         field_82=3 type 0 value 0\nfields_null=2 (Invalid Argument)\n\
         fabric_version_7=25 (Argument version mismatch)\n"
    );
    let unknown = run_check(&dir, &["host"], &[("FAKE_CUDA_NO_HOST_FACTS", "1")])?;
    let not_supported = "3 (Not Supported)";
    assert_eq!(
        String::from_utf8(unknown.stdout)?,
        format!(
            "driver_version=13.0.0+gpupool\nnvml_version=13.0.0+gpupool\npcie_max_generation={n}\n\
             pcie_max_width={n}\npcie_current_generation={n}\npcie_current_width={n}\npcie_max_speed={n}\n\
             pcie_speed={n}\npcie_null_out={n}\nfabric_state=0 status=0 clique=0\nfield_91=3 type 0 value 0\nfield_90=3 type 0 value 0\n\
         field_82=3 type 0 value 0\nfields_null=2 (Invalid Argument)\n\
             fabric_version_7=25 (Argument version mismatch)\n",
            n = not_supported
        )
    );
    assert_eq!(String::from_utf8_lossy(&unknown.stderr), "", "not worth a warning");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn unreachable_pool_is_driver_not_loaded() -> Result<()> {
    let dir = setup("init-fail")?;
    // CUDA_ERROR_NO_DEVICE: what gpupool's libcuda answers when it cannot
    // open a session.
    let out = run_check(&dir, &["init-fail"], &[("FAKE_CUDA_INIT_ERROR", "100")])?;
    assert_eq!(
        String::from_utf8(out.stdout)?,
        "init=9 (Driver Not Loaded)\ncount=1 (Uninitialized)\nshutdown=1 (Uninitialized)\n"
    );
    let stderr = String::from_utf8(out.stderr)?;
    assert!(
        stderr.contains(
            "gpupool libnvidia-ml: no GPU: the CUDA driver is not available: cuInit failed with CUDA error 100"
        ),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
