//! `gpupool-fleetsim`: runs the fleet simulator (docs/fleetsim.md) and
//! writes its tables and plots.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use gpupool_balancer::fleetsim::{self, Config, Trace, report};

#[derive(Debug, Parser)]
#[command(version, about = "Simulates a MIG fleet under several placement policies on the balancer's own pool")]
struct Args {
    /// Parameters (JSON; fields left out keep their defaults). Default: the
    /// built-in ones, as in balancer/fleetsim.json.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replaces the trace seed of the configuration.
    #[arg(long)]
    seed: Option<u64>,
    /// Replaces the number of servers of the configuration.
    #[arg(long)]
    servers: Option<usize>,
    /// Replaces the trace length (hours) of the configuration.
    #[arg(long)]
    hours: Option<f64>,
    /// Replaces the number of functions of the configuration.
    #[arg(long)]
    functions: Option<u32>,
    /// Reads the trace from this CSV file instead of generating it
    /// (`time_ms,function,duration_ms,memory_mib,compute,slo_ms`).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Writes the trace used to this CSV file.
    #[arg(long)]
    write_trace: Option<PathBuf>,
    /// Only these policies (by name; repeatable).
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// Also search, per policy, the smallest fleet that meets this SLO hit
    /// rate (e.g. 0.99), and compare served invocations per GPU-hour there.
    #[arg(long)]
    capacity: Option<f64>,
    /// With --capacity: a number of servers expected to miss the target
    /// (e.g. from an earlier run), to narrow the search; it is checked.
    #[arg(long, default_value_t = 0)]
    capacity_below: usize,
    /// Threads (policies run in parallel).
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    threads: usize,
    /// Prints the configuration in effect (JSON) and exits.
    #[arg(long)]
    print_config: bool,
    /// Folder for the markdown report and SVG plots (printed to stdout too).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Config::from_json(&text)?
        }
        None => Config::default(),
    };
    if let Some(seed) = args.seed {
        config.trace.seed = seed;
    }
    if let Some(servers) = args.servers {
        config.fleet.servers = servers;
    }
    if let Some(hours) = args.hours {
        config.trace.hours = hours;
    }
    if let Some(functions) = args.functions {
        config.trace.functions = functions;
    }
    if !args.policies.is_empty() {
        let unknown: Vec<&String> =
            args.policies.iter().filter(|n| !config.policies.iter().any(|p| p.name == **n)).collect();
        anyhow::ensure!(unknown.is_empty(), "unknown policies {unknown:?}");
        config.policies.retain(|p| args.policies.contains(&p.name));
    }
    config.validate()?;
    if args.print_config {
        println!("{}", serde_json::to_string_pretty(&config)?);
        return Ok(());
    }
    let started = std::time::Instant::now();
    let trace = match &args.trace {
        Some(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            Trace::read_csv(std::io::BufReader::new(file))?
        }
        None => Trace::generate(&config.trace),
    };
    let trace_s = started.elapsed().as_secs_f64();
    if let Some(path) = &args.write_trace {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        trace.write_csv(std::io::BufWriter::new(file))?;
    }
    let started = std::time::Instant::now();
    let outcomes = fleetsim::run_all(&config, &trace, args.threads)?;
    let wall = started.elapsed().as_secs_f64();
    let gpus = config.fleet.servers * config.fleet.gpus_per_server as usize;
    let mut md = String::new();
    md.push_str(&format!(
        "Trace: {} functions, {} invocations over {:.1} h ({}), generated/read in {:.1} s. Fleet: {} servers x {} {} = {} GPUs.\n\
         All policies: {:.1} s wall on {} threads.\n\n",
        trace.functions.len(),
        trace.invocations.len(),
        trace.length_ms as f64 / 3_600_000.0,
        match &args.trace {
            Some(p) => format!("CSV {}", p.display()),
            None => format!("synthetic, seed {}", config.trace.seed),
        },
        trace_s,
        config.fleet.servers,
        config.fleet.gpus_per_server,
        config.fleet.model,
        gpus,
        wall,
        args.threads,
    ));
    md.push_str(&report::table(&outcomes));
    if let Some(target) = args.capacity {
        md.push_str(&format!(
            "\nSmallest fleet meeting {:.1} % SLO hits (searched up to {} servers):\n\n",
            100.0 * target,
            config.fleet.servers
        ));
        md.push_str("| policy | servers | GPUs | SLO hit % | served / GPU-h |\n|---|---:|---:|---:|---:|\n");
        let results = capacity_all(&config, &trace, target, args.capacity_below, args.threads)?;
        for (policy, (servers, o)) in config.policies.iter().zip(results) {
            match servers {
                Some(s) => md.push_str(&format!(
                    "| {} | {s} | {} | {:.2} | {:.0} |\n",
                    policy.name,
                    o.gpus,
                    100.0 * o.slo_hit_rate(),
                    o.served as f64 / o.gpu_hours()
                )),
                None => md.push_str(&format!(
                    "| {} | not reached | {} | {:.2} (at the largest fleet) | - |\n",
                    policy.name,
                    o.gpus,
                    100.0 * o.slo_hit_rate()
                )),
            }
        }
    }
    std::io::stdout().write_all(md.as_bytes())?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("fleetsim.md"), &md)?;
        for (column, name, title) in [
            (1, "slo.svg", "SLO hit rate per interval"),
            (2, "sm.svg", "busy compute slices (SM utilization)"),
            (3, "memory.svg", "memory the sessions need (memory utilization)"),
            (4, "waiting.svg", "functions waiting for a session"),
        ] {
            std::fs::write(dir.join(name), report::svg(&outcomes, column, title))?;
        }
    }
    Ok(())
}

/// [`fleetsim::capacity`] for every policy, on `threads` threads.
fn capacity_all(
    config: &Config,
    trace: &Trace,
    target: f64,
    below: usize,
    threads: usize,
) -> anyhow::Result<Vec<(Option<usize>, fleetsim::Outcome)>> {
    let results = fleetsim::parallel(config.policies.len(), threads, |i| {
        fleetsim::capacity(trace, &config.fleet, &config.policies[i], target, below)
    });
    results.into_iter().map(|r| r.map_err(anyhow::Error::from)).collect()
}
