//! The drop-in `libcuda.so.1` under unmodified programs, against a real
//! gpu-server (worker processes, the emulated device in CI; the GPU suite
//! runs the same programs on the GPU machine):
//! - `driver_api`: a C program built with the system compiler that calls
//!   the driver API directly;
//! - `runtime_nokernel`: built by nvcc (CUDA 13 from PyPI) with the static
//!   runtime, which reaches the driver only through `cuGetProcAddress` and
//!   the export tables;
//! - `graphs_nokernel`: the same, with CUDA graphs, stream capture and
//!   `cudaMallocAsync` memory pools;
//! - `graphs_builtin` (stub only): kernel nodes and captured launches of
//!   gpupool's built-in kernels through the driver API;
//! - `migrate_pause` (stub only): a program whose session moves to another
//!   server halfway through (live migration), and `gpupool-migrate-cudarc`
//!   (this package's cudarc program) likewise.
//!
//! Each program checks every byte it copies and prints `PASS <name>`.
//! The library is a dev-dependency, so cargo builds it before these run.

use anyhow::{Context, Result, bail};
use gpupool_tests::{TOKEN, TestServer, isolated_config};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target"))
}

/// A folder holding the built library as `libcuda.so.1` and `libcuda.so`.
/// Cargo builds it (in `deps/`) because this package depends on it.
fn stub_dir() -> Result<PathBuf> {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let built = target_dir().join(profile).join("deps").join("libcuda.so");
    if !built.exists() {
        bail!("{} is missing: cargo builds it for this package (a dev-dependency)", built.display());
    }
    let dir = target_dir().join("libcuda-test").join(profile);
    std::fs::create_dir_all(&dir)?;
    for name in ["libcuda.so.1", "libcuda.so"] {
        std::fs::copy(&built, dir.join(name)).with_context(|| format!("copying {}", built.display()))?;
    }
    Ok(dir)
}

/// Builds the CI programs once per test binary (the toolchain comes from
/// PyPI on first use).
fn programs() -> Result<&'static (PathBuf, PathBuf)> {
    static BUILT: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let build = || -> Result<(PathBuf, PathBuf)> {
                let stub = stub_dir()?;
                let out = target_dir().join("programs-ci");
                let status = Command::new("bash")
                    .arg(repo().join("tests/programs/build.sh"))
                    .arg("--ci-only")
                    .arg(&out)
                    .env("GPUPOOL_STUB_LIB", &stub)
                    .status()
                    .context("running tests/programs/build.sh")?;
                if !status.success() {
                    bail!("tests/programs/build.sh failed: {status}");
                }
                Ok((stub, out))
            };
            build().map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `program`, to run through the stub against `server`.
fn through_stub(program: impl AsRef<std::ffi::OsStr>, server: &TestServer) -> Result<Command> {
    let (stub, _) = programs()?;
    let mut command = Command::new(program);
    command
        .env("LD_LIBRARY_PATH", stub)
        .env("GPUPOOL_SERVER", server.addr.to_string())
        .env("GPUPOOL_TOKEN", TOKEN)
        .env("GPUPOOL_CERT_SHA256", &server.fingerprint);
    Ok(command)
}

/// Runs one program against `server` through the stub; returns its stdout.
fn run(server: &TestServer, program: &str) -> Result<String> {
    run_with_env(server, program, &[]).map(|(stdout, _)| stdout)
}

/// Runs one program against `server` through the stub with extra
/// environment; returns its stdout and stderr.
fn run_with_env(server: &TestServer, program: &str, env: &[(&str, &str)]) -> Result<(String, String)> {
    let out = through_stub(programs()?.1.join(program), server)?
        .envs(env.iter().copied())
        .output()
        .with_context(|| format!("starting {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || !stdout.contains(&format!("PASS {program}")) {
        bail!("{program} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
    }
    // A panic inside the stub (caught at the C boundary) is a bug even
    // when the program passes, e.g. one during the CUDA runtime's teardown.
    if stderr.contains("panicked at") {
        bail!("{program} passed, but the stub panicked:\n{stderr}");
    }
    Ok((stdout, stderr))
}

/// The call table a program printed (`GPUPOOL_CALL_STATS=1`).
struct CallTable(String);

impl CallTable {
    /// The row of entry point `name`: [calls, local, queued, waited] (the
    /// time column left out).
    fn row(&self, name: &str) -> Vec<u64> {
        let line = self.0.lines().find(|l| l.split_whitespace().next() == Some(name));
        let line = line.unwrap_or_else(|| panic!("no row for {name} in:\n{}", self.0));
        line.split_whitespace().skip(1).take(4).map(|v| v.parse().expect("a count")).collect()
    }
}

/// Runs one program with `GPUPOOL_CALL_STATS=1`; returns its stdout and
/// the call table.
fn run_with_call_table(server: &TestServer, program: &str) -> Result<(String, CallTable)> {
    let (stdout, stderr) = run_with_env(server, program, &[("GPUPOOL_CALL_STATS", "1")])?;
    assert!(stderr.contains("gpupool call table"), "no call table on stderr:\n{stderr}");
    assert!(!stdout.contains("gpupool call table"), "the table goes to stderr");
    Ok((stdout, CallTable(stderr)))
}

/// `GPUPOOL_CALL_STATS=1`: the call table on stderr at exit, stdout the
/// program's own. The driver-API program's synchronous device-to-host
/// copies wait, its memsets are queued, and device queries are local.
#[test]
fn call_table_counts_local_queued_and_waited_calls() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let (_, table) = run_with_call_table(&server, "driver_api")?;
    let row = |name: &str| table.row(name);
    // calls, local, queued, waited
    let dtoh = row("cuMemcpyDtoH_v2");
    assert!(dtoh[0] > 0 && dtoh[3] == dtoh[0], "every synchronous DtoH waits: {dtoh:?}");
    let attr = row("cuDeviceGetAttribute");
    assert!(attr[0] > 0 && attr[1] == attr[0], "device attributes are local: {attr:?}");
    let total = row("total");
    assert_eq!(total[0], total[1] + total[2] + total[3]);
    assert!(total[2] > 0, "some calls were queued: {total:?}");
    server.stop();
    Ok(())
}

#[test]
fn c_program_on_the_driver_api() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, "driver_api")?;
    assert!(out.contains("driver version 13000"), "{out}");
    assert!(out.contains("2D copies ok"), "{out}");
    // With every log line on, the session's close at exit logs too: it did
    // so on a thread whose thread-local storage `exit` had destroyed, and
    // the panic aborted the program (SIGABRT for every exit status).
    let (out, _) = run_with_env(&server, "driver_api", &[("GPUPOOL_LOG", "trace")])?;
    assert!(out.contains("2D copies ok"), "{out}");
    server.stop();
    Ok(())
}

/// Mapped host memory, mirrored by device memory: host writes reach
/// device-side copies, device writes are in host memory after each kind of
/// synchronization, for a status word, a few pages and ranges larger than
/// one reply carries, allocated or registered.
#[test]
fn mapped_host_memory_program() -> Result<()> {
    passes_printing("mapped_nokernel", &["cuMemHostAlloc 4:", "cuMemHostAlloc 4194304:", "cuMemHostRegister:"])
}

/// Pinned memory (`cuMemHostAlloc`, `cuMemAllocHost`) lives in host
/// regions shared with the server when the program shares its host: every
/// copy from and to it, sync and async, names the region (none goes through
/// the bulk path), and the regions are unregistered and unmapped when the
/// program exits. Without shared memory it is plain memory and the same
/// program passes with the bytes sent.
#[test]
fn pinned_memory_program() -> Result<()> {
    let lines = ["pinned copies of 1 bytes ok", "pinned copies of 67108864 bytes ok"];
    let server = TestServer::start(gpupool_tests::server_config())?;
    let out = run(&server, "pinned_copies")?;
    for what in lines {
        assert!(out.contains(what), "{what} missing:\n{out}");
    }
    let m = server.metrics.snapshot();
    assert_eq!((m.bulk_bytes_in, m.bulk_bytes_out), (0, 0), "no staged copies: {m:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.metrics.snapshot().shm_registered + server.metrics.snapshot().shm_regions > 0 {
        assert!(std::time::Instant::now() < deadline, "regions left after the program exited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (out, _) = run_with_env(&server, "pinned_copies", &[("GPUPOOL_SHM", "off")])?;
    assert!(out.contains(lines[1]), "{out}");
    assert!(server.metrics.snapshot().bulk_bytes_in > 0, "plain memory: the bytes went");
    server.stop();
    Ok(())
}

/// Pinned memory used as device memory by its host address, as unified
/// addressing allows natively (XLA does it): the stub's host regions are
/// mapped at the same address in the worker, which registers them, so
/// memsets, device copies and a stream memory operation by that address
/// land in the program's pages, in a worker process and in process. Not
/// without shared memory: then the device cannot reach the pages, and the
/// first such call says so instead of writing elsewhere.
#[test]
fn pinned_memory_is_device_memory_at_its_host_address() -> Result<()> {
    passes_printing("pinned_device", &["pinned memory of 8 bytes as device memory ok", "of 1048580 bytes"])?;
    let server = TestServer::start(gpupool_tests::server_config())?;
    let out = run(&server, "pinned_device")?;
    assert!(out.contains("of 1048580 bytes as device memory ok"), "{out}");
    let err = run_with_env(&server, "pinned_device", &[("GPUPOOL_SHM", "off")]).expect_err("no shared memory");
    assert!(err.to_string().contains("FAIL pinned_device"), "a clear failure, not a crash: {err:#}");
    server.stop();
    Ok(())
}

/// Runs `program` on a fresh server; it must pass and print every line of
/// `lines` (each as a part of its output).
fn passes_printing(program: &str, lines: &[&str]) -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, program)?;
    for what in lines {
        assert!(out.contains(what), "{what} missing:\n{out}");
    }
    server.stop();
    Ok(())
}

/// Managed memory (`cudaMallocManaged`): host and device writes meet at
/// synchronization, copies from host memory land in the host half at once,
/// prefetch and advice are accepted and answered back, pointer attributes
/// say managed with one address.
#[test]
fn managed_memory_program() -> Result<()> {
    passes_printing(
        "managed_nokernel",
        &["managed 4: both ways", "managed 3145728: both ways", "advice and prefetch accepted"],
    )
}

#[test]
fn arrays_and_textures_program() -> Result<()> {
    passes_printing(
        "arrays_nokernel",
        &[
            "2D 300x200: info 32,32,32,32 kind 2 extent 300x200x0 flags 2",
            "3D 8x4x5 flags 1: extent 8x4x5 flags 1",
            "mipmap level 3: 8x8 same handle 1",
            "surface: resource 0 same array 1",
            "cube map 16x8: cudaErrorInvalidValue",
            "copy past the array: cudaErrorInvalidValue",
            "stream attributes: copied sync policy 2, window 1 bytes 65536 hit 0.50 props 2 1",
            "peer copies within the device: done",
            "arrays_nokernel: done",
        ],
    )
}

/// A program that exits ends its session at once (the stub closes it from
/// an exit handler, after the CUDA runtime's teardown calls): the server
/// does not keep its worker and memory until the idle timeout and resume
/// grace (30 s each by default) have passed.
#[test]
fn sessions_end_when_the_program_exits() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    for program in ["runtime_nokernel", "mapped_nokernel", "driver_api"] {
        run(&server, program)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while server.metrics.snapshot().sessions_active > 0 {
            assert!(std::time::Instant::now() < deadline, "{program}'s session outlived the program by 5 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    assert_eq!(server.metrics.snapshot().sessions_opened, 3);
    server.stop();
    Ok(())
}

/// Explicit contexts, limits, launch checks (refused at the launch, nothing
/// latched) and device printf, whose lines must sit between the host lines
/// printed around the synchronization although stdout is a pipe here.
#[test]
fn driver_features_program() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, "driver_features")?;
    assert!(out.contains("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE"), "{out}");
    assert!(out.contains("potential cluster size: 8"), "CUDA's portable cluster size:\n{out}");
    let printed: Vec<&str> =
        out.lines().filter(|l| l.starts_with("host line") || l.starts_with("gpupool printf")).collect();
    assert_eq!(
        printed,
        [
            "host line 1",
            "host line 2",
            "gpupool printf 11: block 0 thread 0",
            "gpupool printf 11: block 0 thread 1",
            "host line 3",
            "gpupool printf 12: block 0 thread 0",
            "host line 4",
            "gpupool printf 13: block 0 thread 0",
            "gpupool printf 13: block 0 thread 1",
            "host line 5",
        ],
        "{out}"
    );
    let out = run(&server, "ctx_create")?;
    assert!(out.contains("execution affinity -> CUDA_ERROR_NOT_SUPPORTED"), "{out}");
    assert!(out.contains("context events: record and wait ordered the copies"), "{out}");
    assert!(
        out.contains(
            "context event during a capture: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; \
             the capture's end: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"
        ),
        "{out}"
    );
    server.stop();
    Ok(())
}

#[test]
fn vmm_program_on_the_driver_api() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, "vmm_nokernel")?;
    for line in [
        "two allocations, one buffer: ok",
        "aliasing ok",
        "growth in place ok",
        "bad requests refused",
        "shareable request ok",
        // Asked of the emulated device, which has no compression.
        "compression supported 0, granted 0",
        "compressible allocation ok",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
    server.stop();
    Ok(())
}

#[test]
fn stream_memory_operations_program() -> Result<()> {
    passes_printing(
        "stream_mem_ops",
        &[
            "writes and met waits ok",
            "captured 3 nodes, 2 of them batch memory operations",
            "captured graph ok",
            "batch memory operation node ok",
        ],
    )
}

/// CUDA 12.8/13's batched copies, prefetches and discards, and
/// `cuStreamGetCtx_v2` (by symbol and through `cuGetProcAddress`): every
/// byte checked; the refusals' codes are CUDA's INVALID_VALUE.
#[test]
fn batched_memory_operations_program() -> Result<()> {
    passes_printing(
        "batch_ops",
        &[
            "batch on the legacy stream: 1",
            "batch whose first attribute index is 1: 1",
            "batch with an invalid access order: 1",
            "SYNC_MEMOPS after setting it: 1",
            "SYNC_MEMOPS on host memory: 1",
            "linear batches: ok",
            "3D batch with a zero width: 1",
            "3D batches: ok",
            "prefetch batch on the legacy stream: 1",
            "managed batches: ok",
            "stream contexts: ok",
        ],
    )
}

/// User objects: references of the program, of graphs (an executable graph
/// keeps the object after its graph is gone), clones and child graphs;
/// every destructor runs once, after the last reference.
#[test]
fn user_objects_program() -> Result<()> {
    passes_printing(
        "user_objects",
        &[
            "after releasing 2 of 3 references: destroyed 0",
            "program references: ok",
            "graph destroyed, its instance alive: destroyed 0",
            "graph and instance references: ok",
            "clone and child graph references: ok",
            "after the update, the new graph's object: destroyed 0",
            "updated instance references: ok",
            "create without NO_DESTRUCTOR_SYNC: 1",
            "create with no references: 1",
            "retain of count 0: 1",
        ],
    )
}

/// CUDA IPC events between two processes of a program (a fork before
/// `cuInit`), each its own session of one server (docs/ipc.md).
#[test]
fn ipc_events_program() -> Result<()> {
    passes_printing(
        "ipc_events",
        &[
            "IPC events supported: 1",
            "handle of an event without INTERPROCESS -> CUDA_ERROR_INVALID_HANDLE",
            "child: opened, waited for and recorded the parent's event",
            "parent: event complete, memory ok",
        ],
    )
}

#[test]
fn nvcc_static_runtime_program() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let (out, table) = run_with_call_table(&server, "runtime_nokernel")?;
    assert!(out.contains("errors ok"), "{out}");
    // The runtime registers the program's fatbin; nothing uses it, so it
    // never reaches the server.
    assert_eq!(table.row("cuLibraryLoadData"), [1, 1, 0, 0]);
    server.stop();
    Ok(())
}

/// CUDA graphs, stream capture and the stream-ordered allocator, all
/// client-side in the stub (issue 16, items 4 and 5).
#[test]
fn graphs_capture_and_memory_pools() -> Result<()> {
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, "graphs_nokernel")?;
    for line in [
        "explicit graph: 8 nodes, 2 roots, 7 edges",
        "exec update with another topology -> cudaErrorGraphExecUpdateFailure, result 2",
        "captured graph: 7 nodes, 1 roots",
        "cudaStreamSynchronize while capturing -> cudaErrorStreamCaptureUnsupported",
        "cudaStreamEndCapture after it -> cudaErrorStreamCaptureInvalidated",
        "memory pools supported: 1",
        "graph memory: 5 nodes, 1 alloc, 1 free",
        "graph memory ok",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    server.stop();
    Ok(())
}

/// Builds `tests/programs/stub_only/<name>.c` beside the CI programs.
/// Built here rather than by build.sh: these programs use gpupool's
/// built-in module, whose image exists only on gpupool servers.
fn build_stub_only(name: &str) -> Result<()> {
    let (stub, out) = programs()?;
    let src = repo().join("tests/programs/stub_only").join(format!("{name}.c"));
    let script = format!(
        "eval \"$(bash {} 2>/dev/null)\" && cc -std=c11 -O2 -Wall -Wextra -pthread -I\"$GPUPOOL_CUDA_INCLUDE\" -o {} {} -L{} -lcuda",
        repo().join("tests/programs/toolchain.sh").display(),
        out.join(name).display(),
        src.display(),
        stub.display()
    );
    let status = Command::new("bash").arg("-c").arg(&script).status().with_context(|| format!("building {name}"))?;
    if !status.success() {
        bail!("building {name} failed: {status}");
    }
    Ok(())
}

/// Libraries load lazily (issue 17): loading one never waits for the
/// server, a never-used one is never sent (nor unloaded there), and the
/// first use loads it once even when two threads use it at once.
#[test]
fn libraries_load_at_first_use() -> Result<()> {
    build_stub_only("library_lazy")?;
    let server = TestServer::start(isolated_config()?)?;
    let (out, table) = run_with_call_table(&server, "library_lazy")?;
    assert!(out.contains("kernel of a library used by two threads at once ok"), "{out}");
    assert!(out.contains("module of a library ok"), "{out}");
    let row = |name: &str| table.row(name);
    // calls, local, queued, waited: 8 unused, 1 null, 2 used.
    assert_eq!(row("cuLibraryLoadData"), [11, 11, 0, 0], "loads never reach the server");
    assert_eq!(row("cuLibraryLoadFromFile"), [1, 1, 0, 0]);
    // 8 unused and one unloaded twice: local; 2 used: queued.
    assert_eq!(row("cuLibraryUnload"), [11, 9, 2, 0]);
    // The first of the two threads loads the library, the other waits on it.
    assert_eq!(row("cuLibraryGetKernel"), [2, 1, 0, 1]);
    assert_eq!(row("cuLibraryGetModule"), [1, 0, 0, 1]);
    assert_eq!(row("cuLibraryGetKernelCount"), [1, 1, 0, 0]);
    server.stop();
    Ok(())
}

/// Fatbins are cut to the device's code before they are sent
/// (`cuda::fatbin`, the library's rlib): a fatbin built by the PyPI nvcc for four
/// architectures, cut for a 9.0 device, is byte for byte the fatbin nvcc
/// builds for sm_90 alone; for a device without a cubin, only the PTX it
/// can compile is left.
#[test]
fn fatbins_cut_to_the_device_match_nvcc() -> Result<()> {
    use cuda::fatbin::{entries, for_device};
    let (_, out) = programs()?;
    let dir = out.join("fatbin");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("k.cu"), "extern \"C\" __global__ void add(float *a, float b) { a[threadIdx.x] += b; }\n")?;
    let nvcc = |name: &str, gencodes: &str| -> Result<Vec<u8>> {
        let script = format!(
            "eval \"$(bash {} 2>/dev/null)\" && cd {} && \"$GPUPOOL_NVCC\" -fatbin -o {name}.fatbin k.cu {gencodes}",
            repo().join("tests/programs/toolchain.sh").display(),
            dir.display(),
        );
        let status = Command::new("bash").arg("-c").arg(&script).status().context("running nvcc")?;
        if !status.success() {
            bail!("nvcc {gencodes} failed: {status}");
        }
        Ok(std::fs::read(dir.join(format!("{name}.fatbin")))?)
    };
    let all = nvcc(
        "all",
        "-gencode arch=compute_75,code=[sm_75,compute_75] -gencode arch=compute_80,code=sm_86 \
         -gencode arch=compute_90,code=[sm_90,compute_90] -gencode arch=compute_100,code=sm_100",
    )?;
    let sm90 = nvcc("sm90", "-gencode arch=compute_90,code=sm_90")?;
    let listed = |image: &[u8]| -> Vec<(u16, u32)> {
        entries(image).expect("a fatbin").1.iter().map(|e| (e.kind, e.arch)).collect()
    };
    assert_eq!(listed(&all), [(2, 75), (1, 75), (2, 86), (2, 90), (1, 90), (2, 100)], "nvcc's layout");
    assert!(for_device(&all, 9, 0)[..] == sm90[..], "cut for 9.0 = nvcc's sm_90 fatbin");
    assert_eq!(listed(&for_device(&all, 8, 9)), [(2, 86)]);
    assert_eq!(listed(&for_device(&all, 12, 0)), [(1, 75), (1, 90)]);
    Ok(())
}

/// Kernel nodes, captured launches (`cuLaunchKernel`, `cuLaunchKernelEx`)
/// and kernels over stream-ordered memory, with gpupool's built-in kernels
/// so that the emulated device runs them.
#[test]
fn graphs_with_builtin_kernels() -> Result<()> {
    build_stub_only("graphs_builtin")?;
    let server = TestServer::start(isolated_config()?)?;
    let out = run(&server, "graphs_builtin")?;
    assert!(out.contains("captured kernels ok"), "{out}");
    server.stop();
    Ok(())
}

/// A failed device assert through the stub: the synchronize fails with
/// CUDA_ERROR_ASSERT, the message (what the driver prints for the failing
/// threads) is on the program's stderr, its stdout is its own, and the
/// context is lost afterwards, as natively.
#[test]
fn a_device_assert_message_reaches_the_programs_stderr() -> Result<()> {
    build_stub_only("assert_builtin")?;
    let server = TestServer::start(isolated_config()?)?;
    let (out, err) = run_with_env(&server, "assert_builtin", &[])?;
    assert!(out.contains("no thread asserts: synchronize ok"), "{out}");
    assert!(out.contains("threads 6 and 7 assert: synchronize -> CUDA_ERROR_ASSERT"), "{out}");
    assert!(out.contains("an allocation after the assert -> CUDA_ERROR_ASSERT"), "{out}");
    for t in [2, 3] {
        let line = gpupool_server::device::builtin::check_below_message([1, 0, 0], [t, 0, 0]);
        assert!(err.lines().any(|l| l == line.trim_end()), "missing {line:?} on stderr:\n{err}");
    }
    assert!(!out.contains("Assertion"), "the message goes to stderr only:\n{out}");
    server.stop();
    Ok(())
}

#[test]
fn unreachable_pool_is_reported() -> Result<()> {
    let (stub, bin) = programs()?;
    // A port nothing listens on: cuInit must fail with NO_DEVICE and say why.
    let out = Command::new(bin.join("driver_api"))
        .env("LD_LIBRARY_PATH", stub)
        .env("GPUPOOL_SERVER", "127.0.0.1:9")
        .env("GPUPOOL_TOKEN", TOKEN)
        .env("GPUPOOL_CERT_SHA256", "00".repeat(32))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stdout.contains("CUDA_ERROR_NO_DEVICE"), "{stdout}");
    assert!(stderr.contains("gpupool: cannot open a session on 127.0.0.1:9"), "{stderr}");
    Ok(())
}

/// The program leases its GPU through the balancer (`GPUPOOL_BALANCER`,
/// over TLS with the balancer's certificate pinned), twice in a row on a
/// pool of one instance: the first run's lease is released when it exits,
/// not when it expires, so the second is not kept waiting. A run pinning
/// another certificate is refused, and says why. The program presents its
/// tenant's credential (the variable, then a file) and names no tenant:
/// the balancer takes it from the credential.
#[test]
fn program_leases_its_gpu_from_the_balancer() -> Result<()> {
    use gpupool_tests::{TestBalancer, tenant_balancer_config, tenant_secret};
    let (stub, bin) = programs()?;
    let mut config = tenant_balancer_config(gpupool_proto::lease::LeaseSigner::from_seed([8; 32]));
    config.pool.lease_ttl_ms = 60_000;
    let balancer = TestBalancer::start(config)?;
    let mut c = isolated_config()?;
    c.tokens = Vec::new();
    let nvml = gpupool_server::mig::SimulatedNvml::from_spec("h100-80gb:mig=2g.20gb")?;
    c.gpus = gpupool_server::mig::prepare::<&str>(&nvml, None)?;
    c.balancer = Some(balancer.link("only"));
    let server = TestServer::start(c)?;
    balancer.wait_for_servers(1)?;
    let secret_file = std::env::temp_dir().join(format!("gpupool-libcuda-secret-{}", std::process::id()));
    std::fs::write(&secret_file, tenant_secret("team-a"))?;
    for round in 0..2 {
        let started = std::time::Instant::now();
        let mut program = Command::new(bin.join("driver_api"));
        program.env("LD_LIBRARY_PATH", stub).envs(balancer.client_env()).env("GPUPOOL_WAIT_MS", "20000");
        if round == 0 {
            program.env("GPUPOOL_BALANCER_SECRET", tenant_secret("team-a"));
        } else {
            program.env("GPUPOOL_BALANCER_SECRET_FILE", &secret_file);
        }
        let out = program.output().context("starting driver_api")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("PASS driver_api") {
            bail!("round {round} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        // A lease kept until expiry would hold the second run for a minute.
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "round {round} waited for the lease");
    }
    assert!(balancer.url().starts_with("https://"));
    let wrong = "ab".repeat(32);
    let out = Command::new(bin.join("driver_api"))
        .env("LD_LIBRARY_PATH", stub)
        .envs(balancer.client_env())
        .env("GPUPOOL_BALANCER_CERT_SHA256", &wrong)
        .env("GPUPOOL_BALANCER_SECRET", tenant_secret("team-a"))
        .output()
        .context("starting driver_api")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not match the pinned") && stderr.contains(&wrong), "{stderr}");
    // Another tenant's name with this credential: refused, with the reason.
    let out = Command::new(bin.join("driver_api"))
        .env("LD_LIBRARY_PATH", stub)
        .envs(balancer.client_env())
        .env("GPUPOOL_BALANCER_SECRET", tenant_secret("team-a"))
        .env("GPUPOOL_TENANT", "team-b")
        .output()
        .context("starting driver_api")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot allocate for tenant \"team-b\""), "{stderr}");
    let _ = std::fs::remove_file(&secret_file);
    server.stop();
    balancer.stop();
    Ok(())
}

/// Every symbol NVIDIA's driver exports is exported by the stub too, the
/// pre-rename ones (`cuCtxPushCurrent` beside `cuCtxPushCurrent_v2`)
/// included: cuBLASLt `dlsym`s a table of them and `cublasCreate` fails
/// when one is missing.
#[test]
fn exports_every_driver_symbol() -> Result<()> {
    let list = std::fs::read_to_string(repo().join("client-stub/libcuda/driver-symbols.txt"))?;
    let wanted: Vec<&str> = list.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert!(wanted.len() > 500, "the list holds the driver's whole API");
    // The stub folder of `programs()`: copying the library again while a
    // program of another test runs from it would truncate its mapping (SIGBUS).
    let lib = programs()?.0.join("libcuda.so.1");
    let out = Command::new("nm").args(["-D", "--defined-only"]).arg(&lib).output().context("running nm")?;
    if !out.status.success() {
        bail!("nm {} failed: {}", lib.display(), String::from_utf8_lossy(&out.stderr));
    }
    let nm = String::from_utf8(out.stdout)?;
    let exported: std::collections::HashSet<&str> = nm.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let missing: Vec<&str> = wanted.iter().copied().filter(|s| !exported.contains(s)).collect();
    assert!(missing.is_empty(), "libcuda.so.1 lacks {} driver symbols: {missing:?}", missing.len());
    Ok(())
}

/// Runs `migrate_pause` against `a`; while it waits between its halves,
/// `between` runs (a migration, or nothing). Its stdout.
fn run_paused(a: &TestServer, between: impl FnOnce()) -> Result<String> {
    use std::io::{BufRead, Write};
    let mut child = through_stub(programs()?.1.join("migrate_pause"), a)?
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting migrate_pause")?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut out = String::new();
    for line in lines.by_ref() {
        let line = line?;
        out += &line;
        out.push('\n');
        if line == "paused" || line.starts_with("FAIL") {
            break;
        }
    }
    if out.ends_with("paused\n") {
        between();
    }
    child.stdin.take().context("stdin")?.write_all(b"go\n")?;
    for line in lines {
        out += &line?;
        out.push('\n');
    }
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() || !out.contains("PASS migrate_pause") || stderr.contains("panicked at") {
        bail!("migrate_pause failed ({}):\n--- stdout\n{out}\n--- stderr\n{stderr}", output.status);
    }
    Ok(out)
}

/// What moving the source's one session did: how many sessions the source
/// held, and the migration's outcome.
type Moved = (usize, Option<Result<gpupool_server::Migrated, String>>);

/// Moves the first session of `a` to `b` (called while a program waits).
fn move_first_session(a: &TestServer, b: &TestServer) -> Moved {
    let ids = a.migrator.sessions();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let outcome = ids.first().map(|&id| rt.block_on(a.migrator.migrate(id, b.migration_target(TOKEN))));
    (ids.len(), outcome.map(|r| r.map_err(|e| e.to_string())))
}

/// The migration a program waited for: one session on the source, moved.
fn moved_one(moved: Option<Moved>) -> Result<gpupool_server::Migrated> {
    let (sessions, outcome) = moved.context("the program never paused")?;
    assert_eq!(sessions, 1, "one session on the source");
    outcome.context("no session to move")?.map_err(anyhow::Error::msg)
}

/// Live migration under an unmodified program (issue 21): the drop-in
/// library's session moves between two servers (worker processes) while
/// the program waits between its halves; the program goes on with the same
/// addresses, stream, event and function, and prints what it prints when
/// its session stays.
#[test]
fn a_program_keeps_running_across_a_migration() -> Result<()> {
    build_stub_only("migrate_pause")?;
    let (a, b) = (TestServer::start(isolated_config()?)?, TestServer::start(isolated_config()?)?);
    let still = run_paused(&a, || ())?;
    let mut moved = None;
    let out = run_paused(&a, || moved = Some(move_first_session(&a, &b)))?;
    let migrated = moved_one(moved)?;
    assert!(migrated.memory_bytes >= 8 << 20, "its two 4 MiB buffers moved: {migrated:?}");
    assert_eq!(out, still, "the same output with and without the move");
    assert!(b.metrics.snapshot().sessions_opened >= 1, "the session arrived on the target");
    Ok(())
}

/// Runs `gpupool-migrate-cudarc STEPS DIR` (a cudarc program) against `a`
/// through the stub; once it waits halfway (DIR/half), `between` runs, then
/// DIR/go lets it go on. The lines that must match between runs.
fn run_cudarc_paused(a: &TestServer, label: &str, steps: usize, between: impl FnOnce()) -> Result<String> {
    let dir = target_dir().join("migrate-cudarc").join(label);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut child = through_stub(env!("CARGO_BIN_EXE_gpupool-migrate-cudarc"), a)?
        .arg(steps.to_string())
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting gpupool-migrate-cudarc")?;
    let start = std::time::Instant::now();
    while !dir.join("half").exists() && child.try_wait()?.is_none() && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if dir.join("half").exists() {
        between();
    }
    std::fs::write(dir.join("go"), b"")?;
    let output = child.wait_with_output()?;
    let out = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let results: String = out
        .lines()
        .filter(|l| l.starts_with("STEP ") || l.starts_with("CHECKSUM "))
        .map(|l| format!("{l}\n"))
        .collect();
    let complete = results.lines().count() == steps + 1 && out.lines().any(|l| l == "DONE");
    if !output.status.success() || !complete || stderr.contains("panicked at") {
        bail!("gpupool-migrate-cudarc failed ({}):\n--- stdout\n{out}\n--- stderr\n{stderr}", output.status);
    }
    assert!(out.contains("kernels from gpupool's built-in module"), "the stub served the built-in module:\n{out}");
    Ok(results)
}

/// A cudarc program across a live migration (issue 21): its context,
/// stream, module, functions, buffers and module variable move between two
/// servers (worker processes) while it waits halfway; it checks every step
/// against the host's arithmetic and prints the same lines as a run that
/// stays. The GPU suite runs the same program with `bench/migrate-torch.sh`
/// (balancer drain, two servers on the card).
#[test]
fn a_cudarc_program_keeps_running_across_a_migration() -> Result<()> {
    const STEPS: usize = 20;
    let (a, b) = (TestServer::start(isolated_config()?)?, TestServer::start(isolated_config()?)?);
    let still = run_cudarc_paused(&a, "stays", STEPS, || ())?;
    let mut moved = None;
    let out = run_cudarc_paused(&a, "moves", STEPS, || moved = Some(move_first_session(&a, &b)))?;
    let migrated = moved_one(moved)?;
    assert!(migrated.memory_bytes >= 8 << 20, "its two 4 MiB buffers moved: {migrated:?}");
    assert_eq!(out, still, "the same lines with and without the move");
    assert!(b.metrics.snapshot().sessions_opened >= 1, "the session arrived on the target");
    Ok(())
}

/// `bench/cutrace` (the call tracer of `bench/dropin.sh CUTRACE=1`) in front
/// of the stub: the CUDA runtime's calls reach the stub through it, the
/// program passes, and the trace names each entry point with its result.
#[test]
fn cutrace_traces_the_runtime_through_the_stub() -> Result<()> {
    let (stub, bin) = programs()?;
    let dir = target_dir().join("cutrace-test");
    let status = Command::new("bash")
        .arg(repo().join("bench/cutrace/build.sh"))
        .arg(&dir)
        .status()
        .context("running bench/cutrace/build.sh")?;
    if !status.success() {
        bail!("bench/cutrace/build.sh failed: {status}");
    }
    let real = dir.join("real");
    std::fs::create_dir_all(&real)?;
    let link = real.join("libcutrace_real.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(stub.join("libcuda.so.1"), &link)?;
    let trace = dir.join("runtime_nokernel.trace");
    let _ = std::fs::remove_file(&trace);
    let server = TestServer::start(isolated_config()?)?;
    let out = Command::new(bin.join("runtime_nokernel"))
        .env("LD_LIBRARY_PATH", format!("{}:{}:{}", dir.display(), real.display(), stub.display()))
        .env("CUTRACE_FILE", &trace)
        .env("GPUPOOL_SERVER", server.addr.to_string())
        .env("GPUPOOL_TOKEN", TOKEN)
        .env("GPUPOOL_CERT_SHA256", &server.fingerprint)
        .output()
        .context("starting runtime_nokernel under cutrace")?;
    server.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("PASS runtime_nokernel"), "{stdout}");
    let lines = std::fs::read_to_string(&trace).context("reading the trace")?;
    for want in ["resolve cuInit = 0", "cuInit = 0", "cuMemAlloc = 0", "cuMemcpyHtoD = 0"] {
        assert!(lines.lines().any(|l| l.trim_start() == want), "no `{want}` in the trace:\n{lines}");
    }
    Ok(())
}
