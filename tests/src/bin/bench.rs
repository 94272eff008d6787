//! `gpupool-bench`: native CUDA (cudarc) against remote gpupool on the same
//! GPU, in one run. The gpu-server runs in-process on 127.0.0.1 port 0; the
//! table goes to stdout, progress to stderr, and `--json PATH` writes the
//! same figures as JSON. `bench/README.md` explains the rows and targets.

#[path = "../bench/mod.rs"]
mod bench;

use bench::{DeviceMode, Options};
use clap::{Parser, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(about = "Native CUDA against remote gpupool on the same GPU")]
struct Args {
    /// `cuda` needs a GPU; `emulated` measures the transport only (no GPU is
    /// used, native figures are n/a); `auto` uses the GPU if there is one.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Timed synchronous round trips (after the warm-up).
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Untimed round trips before the timed ones.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Empty launches queued before the one synchronize.
    #[arg(long, default_value_t = 100_000)]
    launches: usize,
    /// Largest copy in MiB: of 1, 64 and 1024 MiB only those up to this run.
    #[arg(long, default_value_t = 1024)]
    max_copy_mib: usize,
    /// Remote cold starts, each a new session (the median is reported).
    #[arg(long, default_value_t = 10)]
    cold_runs: usize,
    /// `process`: each session in a worker process (the server's default);
    /// `in-process`: sessions share the server's context.
    #[arg(long, value_enum, default_value_t = IsolationArg::Process)]
    isolation: IsolationArg,
    /// The client's batch delay bound in microseconds, or `off` (default:
    /// the client's own).
    #[arg(long, value_name = "US|off")]
    batch_delay_us: Option<String>,
    /// Extra bulk QUIC connections per session (the client's
    /// `bulk_connections`; 0: copies use the session's connection; default:
    /// the client's own).
    #[arg(long, value_name = "N")]
    bulk_connections: Option<usize>,
    /// The client's download piece in MiB (`download_piece_bytes`; default:
    /// the client's own).
    #[arg(long, value_name = "MIB")]
    download_piece_mib: Option<usize>,
    /// Largest UDP payload, client and server (`max_udp_payload`; default:
    /// theirs).
    #[arg(long, value_name = "BYTES")]
    max_udp_payload: Option<u16>,
    /// Also measure every copy through shared memory (`on`, the default:
    /// the client attaches a region, as one on the server's host does), and
    /// the sync round trip with the commands through a ring there; or only
    /// over QUIC (`off`). The QUIC rows keep their names; the shared memory
    /// ones end in `, shm` (`, shm commands` for the round trip).
    #[arg(long, value_name = "on|off", default_value = "on")]
    shm: String,
    /// The server's command reader and reply writer look for their next
    /// frame this long before they sleep (`--io-spin-us` of gpupool-server;
    /// default: the server's own, 0).
    #[arg(long, value_name = "US")]
    server_io_spin_us: Option<u64>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Internal: measure the native cold start in this fresh process, loading
    /// the precompiled module image at PATH, and print the timings.
    #[arg(long, value_name = "PATH", hide = true)]
    native_cold_start: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IsolationArg {
    Process,
    InProcess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Cuda,
    Emulated,
}

impl Args {
    fn options(&self) -> anyhow::Result<Options> {
        let device = match self.device {
            DeviceArg::Auto => DeviceMode::Auto,
            DeviceArg::Cuda => DeviceMode::Cuda,
            DeviceArg::Emulated => DeviceMode::Emulated,
        };
        let options = Options {
            device,
            iterations: self.iterations,
            warmup: self.warmup,
            launches: self.launches,
            max_copy_bytes: self.max_copy_mib.saturating_mul(1 << 20),
            cold_runs: self.cold_runs,
            process_isolation: self.isolation == IsolationArg::Process,
            batch_delay: match self.batch_delay_us.as_deref() {
                None => None,
                Some("off") => Some(None),
                Some(us) => Some(Some(std::time::Duration::from_micros(
                    us.parse().map_err(|_| anyhow::anyhow!("--batch-delay-us must be microseconds or `off`"))?,
                ))),
            },
            bulk_connections: self.bulk_connections,
            download_piece_bytes: self.download_piece_mib.map(|m| m.saturating_mul(1 << 20)),
            max_udp_payload: self.max_udp_payload,
            shm_copies: match self.shm.as_str() {
                "on" => true,
                "off" => false,
                _ => anyhow::bail!("--shm must be `on` or `off`"),
            },
            server_io_spin: self.server_io_spin_us.map(std::time::Duration::from_micros),
        };
        options.validate()?;
        Ok(options)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(|| gpupool_server::device_output::LogWriter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    gpupool_server::worker::run_if_worker();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpupool-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(image) = &args.native_cold_start {
        return bench::native::cold_start_child(image);
    }
    let report = bench::run(&args.options()?)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        bench::write_json(&report, path)?;
        eprintln!("JSON written to {}", path.display());
    }
    Ok(())
}
