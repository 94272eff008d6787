//! The benchmark behind `gpupool-bench`: each row runs the same workload
//! natively through cudarc and remotely through a gpupool session on an
//! in-process gpu-server driving the same GPU, then reports both figures,
//! their ratio and the target.
//! - [`workloads`]: the measured loops, generic over [`workloads::Gpu`];
//! - [`native`]: cudarc (the only `unsafe` code);
//! - [`remote`]: the in-process server and its sessions;
//! - [`report`]: rows, table and JSON.

mod machine;
pub(crate) mod native;
mod remote;
mod report;
mod stats;
mod workloads;

use anyhow::{Context, Result, bail};
use gpupool_server::DeviceChoice;
use native::NativeGpu;
use remote::{LocalServer, RemoteGpu, Tuning};
use report::{Header, Row, Sides, Skipped, Target, Unit};
use std::path::Path;
use std::time::Duration;
use workloads::{ColdStart, size_label};

pub(crate) use report::Report;

/// Sizes of the copy rows, before `--max-copy-mib`.
const COPY_SIZES: [usize; 3] = [1 << 20, 64 << 20, 1 << 30];
/// Size of the lz4 rows, before `--max-copy-mib`.
const LZ4_SIZE: usize = 64 << 20;
/// Runs of the async-launch row (the median is reported).
const LAUNCH_RUNS: usize = 3;
/// Memory of the emulated device (host memory, touched only where used).
const EMULATED_MEMORY: u64 = 16 << 30;
/// Seed of the random copy data, fixed so runs copy the same bytes.
const DATA_SEED: u64 = 0x6770_7570_6f6f_6c21;

// The targets.
const RTT_TARGET_US: f64 = 50.0;
/// The same round trip with the commands through shared memory (issue 18,
/// item 3: a client on the server's host), on the H200.
const SHM_RTT_TARGET_US: f64 = 15.0;
const LAUNCH_RATIO_TARGET: f64 = 1.5;
const HTOD_TARGET_SIZE: usize = 1 << 30;
const HTOD_TARGET_GIBS: f64 = 2.0;
/// Pinned copies through shared memory: at least this share of native
/// (issue 18 item 3's acceptance).
const PINNED_RATIO_TARGET: f64 = 0.8;
const COLD_START_TARGET_MS: f64 = 50.0;

/// Which device the server drives, and so whether native runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeviceMode {
    /// The GPU if there is one (native too), else the emulated device.
    Auto,
    /// GPU 0, native and remote; failing to open either is an error.
    Cuda,
    /// No GPU: remote figures measure the transport only.
    Emulated,
}

impl DeviceMode {
    fn server_choice(self) -> DeviceChoice {
        match self {
            DeviceMode::Auto => DeviceChoice::Auto,
            DeviceMode::Cuda => DeviceChoice::Cuda { ordinal: 0 },
            DeviceMode::Emulated => DeviceChoice::Emulated { memory: EMULATED_MEMORY },
        }
    }

    fn name(self) -> &'static str {
        match self {
            DeviceMode::Auto => "auto",
            DeviceMode::Cuda => "cuda",
            DeviceMode::Emulated => "emulated",
        }
    }
}

/// What to measure and how often.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) device: DeviceMode,
    pub(crate) iterations: usize,
    pub(crate) warmup: usize,
    pub(crate) launches: usize,
    pub(crate) max_copy_bytes: usize,
    pub(crate) cold_runs: usize,
    /// Sessions in worker processes (the server's default) or in-process.
    pub(crate) process_isolation: bool,
    /// The client's batch delay bound, when not the default (`None` inside:
    /// off).
    pub(crate) batch_delay: Option<Option<Duration>>,
    /// The client's bulk connections, when not the default.
    pub(crate) bulk_connections: Option<usize>,
    /// The client's download piece, when not the default.
    pub(crate) download_piece_bytes: Option<usize>,
    /// Client's and server's largest UDP payload, when not the default.
    pub(crate) max_udp_payload: Option<u16>,
    /// Also measure copies through shared memory.
    pub(crate) shm_copies: bool,
    /// The server's `io_spin`, when not its default.
    pub(crate) server_io_spin: Option<Duration>,
}

impl Options {
    /// Reports every bad setting at once.
    pub(crate) fn validate(&self) -> Result<()> {
        let mut bad = Vec::new();
        if self.iterations == 0 {
            bad.push("--iterations must be at least 1");
        }
        if self.launches == 0 {
            bad.push("--launches must be at least 1");
        }
        if self.max_copy_bytes < COPY_SIZES[0] {
            bad.push("--max-copy-mib must be at least 1");
        }
        if self.cold_runs == 0 {
            bad.push("--cold-runs must be at least 1");
        }
        if self.download_piece_bytes.is_some_and(|b| b < 1 << 20) {
            bad.push("--download-piece-mib must be at least 1");
        }
        if bad.is_empty() { Ok(()) } else { bail!("{}", bad.join("; ")) }
    }

    fn copy_sizes(&self) -> Vec<usize> {
        COPY_SIZES.into_iter().filter(|&s| s <= self.max_copy_bytes).collect()
    }

    fn lz4_size(&self) -> usize {
        LZ4_SIZE.min(self.max_copy_bytes)
    }

    fn settings(&self) -> Vec<(&'static str, String)> {
        let sizes: Vec<String> = self.copy_sizes().into_iter().map(size_label).collect();
        vec![
            ("device", self.device.name().to_string()),
            ("iterations", self.iterations.to_string()),
            ("warmup", self.warmup.to_string()),
            ("launches", self.launches.to_string()),
            ("launch_runs", LAUNCH_RUNS.to_string()),
            ("copies", sizes.join(",").replace(' ', "")),
            ("cold_runs", self.cold_runs.to_string()),
            ("isolation", if self.process_isolation { "process" } else { "in-process" }.to_string()),
            (
                "batch_delay",
                match self.batch_delay {
                    None => "default".to_string(),
                    Some(None) => "off".to_string(),
                    Some(Some(d)) => format!("{}us", d.as_micros()),
                },
            ),
            ("bulk_connections", self.bulk_connections.map_or("default".into(), |n| n.to_string())),
            ("download_piece_mib", self.download_piece_bytes.map_or("default".into(), |b| (b >> 20).to_string())),
            ("max_udp_payload", self.max_udp_payload.map_or("default".into(), |n| n.to_string())),
            ("server_io_spin_us", self.server_io_spin.map_or("default".into(), |d| d.as_micros().to_string())),
            ("shm_copies", if self.shm_copies { "on" } else { "off" }.to_string()),
        ]
    }
}

fn progress(what: &str) {
    eprintln!("[gpupool-bench] {what}");
}

/// Measures `f` natively when there is a native GPU.
fn on_native<T>(native: Option<&NativeGpu>, f: impl FnOnce(&NativeGpu) -> Result<T>) -> Result<Option<T>> {
    native.map(f).transpose()
}

/// Native CUDA, or why there is none.
type MaybeNative = std::result::Result<NativeGpu, String>;

/// Opens native CUDA where the mode and the server's backend call for it:
/// `Err(why)` when it is skipped, or unavailable in `auto` mode.
fn open_native(mode: DeviceMode, server_backend: &str) -> MaybeNative {
    match (mode, server_backend) {
        (DeviceMode::Emulated, _) => Err("--device emulated: no GPU used, native CUDA skipped".into()),
        (_, "emulated") => {
            Err("no GPU found (the server fell back to the emulated device), native CUDA skipped".into())
        }
        (DeviceMode::Cuda | DeviceMode::Auto, _) => NativeGpu::open(0).map_err(|e| format!("{e:#}")),
    }
}

/// Runs every row.
pub(crate) fn run(opts: &Options) -> Result<Report> {
    // `cuda` needs native CUDA: fail on it first, with its own message.
    let early_native = match opts.device {
        DeviceMode::Cuda => Some(Ok(NativeGpu::open(0)?)),
        DeviceMode::Auto | DeviceMode::Emulated => None,
    };
    progress(&format!("starting the in-process gpu-server (device {})", opts.device.name()));
    let tuning = Tuning {
        batch_delay: opts.batch_delay,
        bulk_connections: opts.bulk_connections,
        download_piece_bytes: opts.download_piece_bytes,
        max_udp_payload: opts.max_udp_payload,
        server_io_spin: opts.server_io_spin,
    };
    let server = LocalServer::start(opts.device.server_choice(), opts.process_isolation, tuning)?;
    let gpu_used = server.backend() == "cuda";
    if !gpu_used {
        progress("NO GPU IN USE: the server runs the emulated device; remote figures measure the transport only");
    }
    let native = early_native.unwrap_or_else(|| open_native(opts.device, server.backend()));
    if let Err(why) = &native {
        progress(&format!("native: {why}"));
    }
    let native_gpu = native.as_ref().ok();
    let remote = RemoteGpu::open(&server)?;
    let server_device = remote.device_name();

    let mut rows = Vec::new();
    let mut skipped_targets = Vec::new();
    rows.extend(round_trip_rows(opts, native_gpu, &remote)?);
    if opts.shm_copies {
        rows.extend(shm_round_trip_rows(opts, native_gpu, &server)?);
    }
    rows.push(launch_row(opts, native_gpu, &remote)?);
    rows.push(paced_launch_row(native_gpu, &remote)?);
    let (copy_rows, skipped) = copy_rows(opts, native_gpu, &remote, &server)?;
    rows.extend(copy_rows);
    skipped_targets.extend(skipped);
    rows.extend(cold_start_rows(opts, native_gpu, &server)?);
    rows.extend(lz4_rows(opts, &remote)?);

    remote.close()?;
    let gpu = match (&native, gpu_used) {
        (Ok(n), _) => Some(n.name().to_string()),
        (Err(_), true) => Some(server_device.clone()),
        (Err(_), false) => None,
    };
    let header = Header {
        date: machine::utc_now(),
        host: machine::hostname(),
        gpu,
        commit: machine::commit(),
        backend: server.backend().to_string(),
        server_device,
        native_missing: native.as_ref().err().cloned(),
        settings: opts.settings(),
    };
    drop(native);
    server.stop()?;
    Ok(Report { header, rows, skipped_targets })
}

fn round_trip_rows(opts: &Options, native: Option<&NativeGpu>, remote: &RemoteGpu) -> Result<Vec<Row>> {
    progress(&format!("sync round trips: {} + {} warm-up", opts.iterations, opts.warmup));
    let n = on_native(native, |g| workloads::sync_round_trips(g, opts.warmup, opts.iterations))?;
    let r = workloads::sync_round_trips(remote, opts.warmup, opts.iterations)?;
    let us = |d: Duration| Unit::Micros.of(d);
    let note = format!("empty kernel launch + stream synchronize, {} iterations", r.len());
    Ok(vec![
        Row::new("sync round trip, median", Unit::Micros, n.as_ref().map(|s| us(s.median())), Some(us(r.median())))
            .target(Target::RemoteAtMost(RTT_TARGET_US))
            .note(note),
        Row::new("sync round trip, p99", Unit::Micros, n.as_ref().map(|s| us(s.p99())), Some(us(r.p99()))),
    ])
}

/// The round trip of a session whose commands go through a command ring in
/// shared memory (checked: an error when they would go over QUIC).
fn shm_round_trip_rows(opts: &Options, native: Option<&NativeGpu>, server: &LocalServer) -> Result<Vec<Row>> {
    progress(&format!(
        "sync round trips, commands through shared memory: {} + {} warm-up",
        opts.iterations, opts.warmup
    ));
    let shm = RemoteGpu::open_shm_commands(server)?;
    let n = on_native(native, |g| workloads::sync_round_trips(g, opts.warmup, opts.iterations))?;
    let r = workloads::sync_round_trips(&shm, opts.warmup, opts.iterations)?;
    shm.check_shm_commands()?;
    shm.close()?;
    let us = |d: Duration| Unit::Micros.of(d);
    let note = format!("as above, the session's commands through a ring in shared memory, {} iterations", r.len());
    Ok(vec![
        Row::new(
            "sync round trip, median, shm commands",
            Unit::Micros,
            n.as_ref().map(|s| us(s.median())),
            Some(us(r.median())),
        )
        .target(Target::RemoteAtMost(SHM_RTT_TARGET_US))
        .note(note),
        Row::new(
            "sync round trip, p99, shm commands",
            Unit::Micros,
            n.as_ref().map(|s| us(s.p99())),
            Some(us(r.p99())),
        ),
    ])
}

fn launch_row(opts: &Options, native: Option<&NativeGpu>, remote: &RemoteGpu) -> Result<Row> {
    progress(&format!("{} async launches + 1 synchronize, {LAUNCH_RUNS} runs", opts.launches));
    let n = on_native(native, |g| workloads::async_launches(g, opts.launches, LAUNCH_RUNS))?;
    let r = workloads::async_launches(remote, opts.launches, LAUNCH_RUNS)?;
    let s = |d: Duration| Unit::Seconds.of(d);
    Ok(Row::new(format!("{} async launches + sync", opts.launches), Unit::Seconds, n.map(s), Some(s(r)))
        .target(Target::RatioAtMost(LAUNCH_RATIO_TARGET))
        .note(format!("total time, median of {LAUNCH_RUNS} runs")))
}

/// Launches paced like a framework's operations.
const PACED_LAUNCHES: usize = 5000;
const PACE: Duration = Duration::from_micros(20);

fn paced_launch_row(native: Option<&NativeGpu>, remote: &RemoteGpu) -> Result<Row> {
    progress(&format!("{PACED_LAUNCHES} launches with {PACE:?} of host work each, {LAUNCH_RUNS} runs"));
    let n = on_native(native, |g| workloads::paced_launches(g, PACED_LAUNCHES, PACE, LAUNCH_RUNS))?;
    let r = workloads::paced_launches(remote, PACED_LAUNCHES, PACE, LAUNCH_RUNS)?;
    let us = |d: Duration| Unit::Micros.of(d / PACED_LAUNCHES as u32);
    Ok(Row::new(format!("launch per {} µs of host work", PACE.as_micros()), Unit::Micros, n.map(us), Some(us(r))).note(
        format!("time per launch of {PACED_LAUNCHES} launches + sync, median of {LAUNCH_RUNS} runs; host work spins"),
    ))
}

fn copy_rows(
    opts: &Options,
    native: Option<&NativeGpu>,
    remote: &RemoteGpu,
    server: &LocalServer,
) -> Result<(Vec<Row>, Vec<Skipped>)> {
    let sizes = opts.copy_sizes();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    progress(&format!("generating {} of random data", size_label(largest)));
    let data = workloads::random_bytes(largest, DATA_SEED);
    // A second session whose copies go through shared memory.
    let shm = if opts.shm_copies { Some(RemoteGpu::open_shm(server)?) } else { None };
    let (mut ups, mut downs, mut shm_ups, mut shm_downs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pinned_ups, mut pinned_downs) = (Vec::new(), Vec::new());
    for &size in &sizes {
        progress(&format!("copies of {}, verified once byte for byte", size_label(size)));
        let slice = &data[..size];
        let n = on_native(native, |g| workloads::copies(g, slice))?;
        let r = workloads::copies(remote, slice)?;
        let label = size_label(size);
        let mut up = Row::new(format!("HtoD {label}"), Unit::GibPerSec, n.map(|c| c.htod), Some(r.htod));
        if size == HTOD_TARGET_SIZE {
            up = up.target(Target::RemoteAtLeast(HTOD_TARGET_GIBS));
        }
        ups.push(up);
        downs.push(Row::new(format!("DtoH {label}"), Unit::GibPerSec, n.map(|c| c.dtoh), Some(r.dtoh)));
        if let Some(shm) = &shm {
            progress(&format!("copies of {} through shared memory", size_label(size)));
            let s = shm.copies_through_shm(slice)?;
            shm_ups.push(Row::new(format!("HtoD {label}, shm"), Unit::GibPerSec, n.map(|c| c.htod), Some(s.htod)));
            shm_downs.push(Row::new(format!("DtoH {label}, shm"), Unit::GibPerSec, n.map(|c| c.dtoh), Some(s.dtoh)));
            progress(&format!("copies of {} from and to pinned memory in a shared host region", size_label(size)));
            let np = on_native(native, |g| workloads::pinned_copies(g, slice))?;
            let p = shm.pinned_copies_through_shm(slice)?;
            let (up, down) = (format!("HtoD {label}, shm pinned"), format!("DtoH {label}, shm pinned"));
            let target = Target::RatioAtLeast(PINNED_RATIO_TARGET);
            pinned_ups.push(Row::new(up, Unit::GibPerSec, np.map(|c| c.htod), Some(p.htod)).target(target));
            pinned_downs.push(Row::new(down, Unit::GibPerSec, np.map(|c| c.dtoh), Some(p.dtoh)).target(target));
        }
    }
    if let Some(shm) = shm {
        shm.close()?;
    }
    if let Some(first) = ups.first_mut() {
        first.note = Some(
            "pageable host memory, random data; median of 3 to 20 copies; HtoD includes a synchronize; over QUIC"
                .into(),
        );
    }
    if let Some(first) = shm_ups.first_mut() {
        first.note = Some("the same, through the client's shared-memory region with the server (same host)".into());
    }
    let skipped = if sizes.contains(&HTOD_TARGET_SIZE) {
        Vec::new()
    } else {
        vec![Skipped {
            goal: format!("HtoD {} ≥ {HTOD_TARGET_GIBS} GiB/s", size_label(HTOD_TARGET_SIZE)),
            reason: format!("copies capped at {} by --max-copy-mib", size_label(opts.max_copy_bytes)),
        }]
    };
    if let Some(first) = pinned_ups.first_mut() {
        first.note = Some(
            "pinned host memory (native cuMemHostAlloc; remote: the session's host region, registered by the server), async copy + synchronize".into(),
        );
    }
    ups.extend(shm_ups);
    ups.extend(pinned_ups);
    ups.extend(downs);
    ups.extend(shm_downs);
    ups.extend(pinned_downs);
    Ok((ups, skipped))
}

fn cold_start_rows(opts: &Options, native: Option<&NativeGpu>, server: &LocalServer) -> Result<Vec<Row>> {
    progress("cold start to first kernel result");
    let mut rows = Vec::new();
    let n: Option<ColdStart> = on_native(native, NativeGpu::cold_start)?;
    let mut runs = Vec::with_capacity(opts.cold_runs);
    for _ in 0..opts.cold_runs {
        runs.push(remote::cold_start(server)?);
    }
    let median = |f: fn(&ColdStart) -> Duration| stats::Samples::new(runs.iter().map(f).collect()).median();
    let ms = |d: Duration| Unit::Millis.of(d);
    let phase = |name: &str, f: fn(&ColdStart) -> Duration| {
        Row::new(name, Unit::Millis, n.as_ref().map(|c| ms(f(c))), Some(ms(median(f))))
    };
    rows.push(
        phase("cold start → first result", ColdStart::total).target(Target::RemoteBelow(COLD_START_TARGET_MS)).note(
            format!(
                "native: 1 run in a fresh process (cuInit + primary context, cubin load, vector_add with copies; \
                 NVRTC excluded); remote: median of {} new sessions on the warm server (connect, built-in module \
                 load, vector_add with copies); phases are medians each",
                opts.cold_runs
            ),
        ),
    );
    rows.push(phase("  context | connect + session", |c| c.setup));
    rows.push(phase("  module load", |c| c.module_load));
    rows.push(phase("  vector_add, inputs up, result back", |c| c.first_result));
    if let Some(g) = native {
        rows.push(
            Row::new("NVRTC compile of builtin.cu", Unit::Millis, Some(ms(g.nvrtc_compile())), None)
                .only(Sides::NativeOnly)
                .note("to a cubin, once; the server compiles once per process, before these runs"),
        );
    }
    Ok(rows)
}

fn lz4_rows(opts: &Options, remote: &RemoteGpu) -> Result<Vec<Row>> {
    let size = opts.lz4_size();
    let label = size_label(size);
    progress(&format!("lz4 effect: {label} mostly zeros vs random"));
    let sparse = workloads::copies(remote, &workloads::compressible_bytes(size))?;
    let random = workloads::copies(remote, &workloads::random_bytes(size, DATA_SEED ^ 1))?;
    let row = |name: String, v: f64| Row::new(name, Unit::GibPerSec, None, Some(v)).only(Sides::RemoteOnly);
    Ok(vec![
        row(format!("lz4: HtoD {label} mostly zeros"), sparse.htod)
            .note("remote only; one non-zero word per 4 KiB page, against random bytes lz4 cannot shrink"),
        row(format!("lz4: HtoD {label} random"), random.htod),
        row(format!("lz4: DtoH {label} mostly zeros"), sparse.dtoh),
        row(format!("lz4: DtoH {label} random"), random.dtoh),
    ])
}

/// Writes the report as JSON to `path`.
pub(crate) fn write_json(report: &Report, path: &Path) -> Result<()> {
    std::fs::write(path, format!("{}\n", report.json())).with_context(|| format!("writing {}", path.display()))
}
