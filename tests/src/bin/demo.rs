//! `gpupool-demo`: starts a gpu-server on 127.0.0.1 (the GPU if one is
//! present, the emulated device otherwise), connects a client over QUIC and
//! runs a small workload end to end, printing what it did.

use anyhow::{Context, ensure};
use clap::Parser;
use gpupool_client::{DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_server::{DeviceChoice, Isolation, WorkerCommand};
use gpupool_tests::{TestServer, fresh_seed, random_f32, rel_error, server_config};
use std::time::{Duration, Instant};

#[derive(Debug, Parser)]
#[command(about = "Run a gpupool server and a client workload end to end")]
struct Args {
    /// `auto` (GPU 0 if present, else emulated), `cuda` or `emulated`.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn main() -> anyhow::Result<()> {
    // Logs on stderr: a worker process's stdout carries its protocol.
    tracing_subscriber::fmt()
        .with_writer(|| gpupool_server::device_output::LogWriter)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    gpupool_server::worker::run_if_worker();
    let args = Args::parse();
    let mut config = server_config();
    // Each session in its own worker process (this executable again), as
    // the server runs by default.
    config.isolation = Isolation::Process {
        command: WorkerCommand {
            program: std::env::current_exe().context("locating this executable")?,
            args: vec![gpupool_server::worker::WORKER_ARG.into()],
        },
        warm: 1,
        start_timeout: Duration::from_secs(60),
    };
    config.device = match args.device.as_str() {
        "auto" => DeviceChoice::Auto,
        "cuda" => DeviceChoice::Cuda { ordinal: 0 },
        "emulated" => DeviceChoice::Emulated { memory: 8 << 30 },
        other => anyhow::bail!("unknown device {other:?}: use auto, cuda or emulated"),
    };
    let t = Instant::now();
    let server = TestServer::start(config).context("starting the server")?;
    println!(
        "server: listening on {} ({} backend), certificate SHA-256 {}",
        server.addr, server.backend, server.fingerprint
    );
    if server.backend == "emulated" {
        println!("server: NOTE: no GPU is in use; kernels run on the emulated device");
    }
    println!("server: ready in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);

    let t = Instant::now();
    let s = Session::connect(&server.client_config()).context("connecting")?;
    let dev = s.device();
    println!(
        "client: session {} on \"{}\" (sm_{}{}, {} SMs, {} MiB quota) in {:.1} ms",
        s.welcome().session_id,
        dev.name,
        dev.compute_capability_major,
        dev.compute_capability_minor,
        dev.multiprocessor_count,
        s.welcome().memory_quota >> 20,
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let m = s.module_load(gpupool_proto::BUILTIN_MODULE)?;
    println!(
        "client: loaded the built-in module ({}) in {:.1} ms",
        m.functions.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
        t.elapsed().as_secs_f64() * 1e3
    );

    // saxpy on a million elements.
    let n = 1 << 20;
    let seed = fresh_seed();
    let (x, y) = (random_f32(n, seed), random_f32(n, seed + 1));
    let t = Instant::now();
    let (dx, dy) = (DeviceBuffer::from_slice(&s, &x)?, DeviceBuffer::from_slice(&s, &y)?);
    let saxpy = m.function("saxpy")?;
    s.launch(
        &saxpy,
        LaunchConfig::for_elements(n as u32, 256),
        StreamId::DEFAULT,
        &[KernelArg::F32(2.5), dx.arg(), dy.arg(), KernelArg::U32(n as u32)],
    )?;
    let out = dy.to_vec()?;
    let want: Vec<f64> = x.iter().zip(&y).map(|(a, b)| 2.5 * f64::from(*a) + f64::from(*b)).collect();
    let err = rel_error(&out, &want);
    ensure!(err < 1e-5, "saxpy result wrong: relative error {err:e}");
    println!(
        "client: saxpy of {n} floats (8 MiB up, 4 MiB down) in {:.1} ms, relative error {err:.1e}",
        t.elapsed().as_secs_f64() * 1e3
    );

    // A 256 x 256 x 256 matrix product.
    let d = 256usize;
    let (a, b) = (random_f32(d * d, seed + 2), random_f32(d * d, seed + 3));
    let t = Instant::now();
    let (da, db) = (DeviceBuffer::from_slice(&s, &a)?, DeviceBuffer::from_slice(&s, &b)?);
    let dc = DeviceBuffer::<f32>::new(&s, d * d)?;
    let matmul = m.function("matmul_f32")?;
    let cfg = LaunchConfig {
        grid: ((d as u32).div_ceil(16), (d as u32).div_ceil(16), 1),
        block: (16, 16, 1),
        shared_mem_bytes: 0,
    };
    let dd = KernelArg::U32(d as u32);
    s.launch(&matmul, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), dd, dd, dd])?;
    let c = dc.to_vec()?;
    let mut want = vec![0f64; d * d];
    for r in 0..d {
        for col in 0..d {
            want[r * d + col] = (0..d).map(|k| f64::from(a[r * d + k]) * f64::from(b[k * d + col])).sum();
        }
    }
    let err = rel_error(&c, &want);
    ensure!(err < 1e-5, "matmul result wrong: relative error {err:e}");
    println!("client: {d}x{d}x{d} matmul in {:.1} ms, relative error {err:.1e}", t.elapsed().as_secs_f64() * 1e3);

    // Batching: many launches, one round trip.
    let empty = m.function("empty")?;
    let before = s.batches_sent();
    let t = Instant::now();
    for _ in 0..10_000 {
        s.launch(&empty, LaunchConfig::for_elements(1, 1), StreamId::DEFAULT, &[])?;
    }
    s.synchronize()?;
    let flushes = s.batches_sent() - before;
    println!(
        "client: 10000 launches + synchronize in {:.1} ms, {flushes} flush(es) to the server",
        t.elapsed().as_secs_f64() * 1e3
    );

    let (free, total) = s.mem_get_info();
    println!("client: virtual GPU memory {} MiB free of {} MiB", free >> 20, total >> 20);
    drop((dx, dy, da, db, dc));
    s.close()?;
    // The worker reports its counters as it exits.
    let t = Instant::now();
    while server.metrics.snapshot().sessions_active > 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = server.metrics.snapshot();
    println!(
        "server: {} session(s), {} batches, {} calls, {} call errors",
        m.sessions_opened, m.batches, m.calls, m.call_errors
    );
    server.stop();
    println!("demo: OK");
    Ok(())
}
