//! `gpupool-worker`: a session worker process for the tests' servers. Cargo
//! builds a package's binaries before its integration tests, so the tests
//! always find this one (see `gpupool_tests::worker_command`); the real
//! server uses its own binary (`gpupool-server worker`).

fn main() {
    tracing_subscriber::fmt()
        .with_writer(|| gpupool_server::device_output::LogWriter)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    gpupool_server::worker::run_if_worker();
    eprintln!("gpupool-worker: started by a gpupool server as `gpupool-worker worker`, never by hand");
    std::process::exit(2);
}
