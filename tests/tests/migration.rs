//! Live migration end to end (issue 21): real servers on 127.0.0.1, a real
//! client session. The session moves between its calls; the client keeps
//! going with the same addresses and gets the same results as a session
//! that never moved. A refused or unreachable target leaves the session
//! running where it was.

use gpupool_client::{DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::BUILTIN_MODULE;
use gpupool_server::Migrated;
use gpupool_server::ServerConfig;
use gpupool_tests::{TOKEN, TestServer, fresh_seed, isolated_config, random_f32, server_config};

/// Floats per buffer: 4 MiB each.
const N: usize = 1 << 20;

/// A program's state: its session, module, buffers.
struct Program {
    session: Session,
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    stream: StreamId,
}

impl Program {
    fn start(srv: &TestServer, seed: u64) -> Program {
        let session = Session::connect(&srv.client_config()).expect("session");
        let x = DeviceBuffer::from_slice(&session, &random_f32(N, seed)).expect("x");
        let y = DeviceBuffer::from_slice(&session, &random_f32(N, seed + 1)).expect("y");
        let stream = session.stream_create(0, 0).expect("stream");
        Program { session, x, y, stream }
    }

    /// Steps of saxpy on the program's stream (the module loaded each
    /// time: a load after a migration finds its image on the target).
    fn steps(&self, from: u32, to: u32) {
        let module = self.session.module_load(BUILTIN_MODULE).expect("module");
        let saxpy = module.function("saxpy").expect("saxpy");
        for step in from..to {
            let alpha = 0.25 + step as f32;
            let args = [KernelArg::F32(alpha), self.x.arg(), self.y.arg(), KernelArg::U32(N as u32)];
            let cfg = LaunchConfig::for_elements(N as u32, 256);
            self.session.launch(&saxpy, cfg, self.stream, &args).expect("launch");
        }
        self.session.stream_synchronize(self.stream).expect("synchronize");
    }

    fn result(&self) -> Vec<u8> {
        let y = self.y.to_vec().expect("read y");
        y.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

fn migrate(from: &TestServer, to: &TestServer, token: &str) -> Result<Migrated, gpupool_server::ServerError> {
    let ids = from.migrator.sessions();
    assert_eq!(ids.len(), 1, "one session on the source: {ids:?}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(from.migrator.migrate(ids[0], to.migration_target(token)))
}

/// Two in-process servers, a seed, and the bytes six steps of the program
/// leave on the first server when it never moves.
fn two_servers() -> (TestServer, TestServer, u64, Vec<u8>) {
    two_servers_with(server_config)
}

fn two_servers_with(config: impl Fn() -> ServerConfig) -> (TestServer, TestServer, u64, Vec<u8>) {
    let (a, b) = (TestServer::start(config()).expect("a"), TestServer::start(config()).expect("b"));
    let seed = fresh_seed();
    let still = Program::start(&a, seed);
    still.steps(0, 6);
    let want = still.result();
    still.session.close().expect("close");
    (a, b, seed, want)
}

fn emulated_only() -> bool {
    // The target must reserve the source's range: two servers on one GPU
    // is the GPU suite's run (bench/gpu-suite.sh).
    std::env::var("GPUPOOL_TEST_DEVICE").as_deref() != Ok("cuda")
}

#[test]
fn a_session_keeps_running_across_a_migration_with_identical_results() {
    if !emulated_only() {
        return;
    }
    moves_with_identical_results(two_servers());
}

/// Both servers with every session in a worker process (the default): the
/// source's worker sends the session to a worker of the target.
#[test]
fn a_session_in_a_worker_process_moves_to_a_worker_of_another_server() {
    if !emulated_only() {
        return;
    }
    moves_with_identical_results(two_servers_with(|| isolated_config().expect("worker command")));
}

fn moves_with_identical_results((a, b, seed, want): (TestServer, TestServer, u64, Vec<u8>)) {
    let moving = Program::start(&a, seed);
    let addrs = (moving.x.addr(), moving.y.addr());
    moving.steps(0, 3);
    let done = migrate(&a, &b, TOKEN).expect("migration succeeds");
    assert_eq!(done.memory_bytes, 8 << 20, "both buffers moved");
    eprintln!("pause {:?} for {} bytes", done.pause, done.memory_bytes);
    moving.steps(3, 6);
    assert_eq!((moving.x.addr(), moving.y.addr()), addrs, "same addresses");
    assert!(moving.result() == want, "results identical to the session that did not move");
    // The source lets go of the session once its client left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.metrics.snapshot().sessions_active > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(a.migrator.sessions().len(), 0, "the source holds no session any more");
    assert_eq!(a.metrics.snapshot().sessions_active, 0);
    assert_eq!(b.migrator.sessions().len(), 1, "the target holds it");
    assert_eq!(b.metrics.snapshot().sessions_active, 1);
}

#[test]
fn a_refused_or_unreachable_target_leaves_the_session_running_on_the_source() {
    if !emulated_only() {
        return;
    }
    stays_when_the_target_fails(two_servers());
}

#[test]
fn a_failed_migration_leaves_a_worker_process_session_running() {
    if !emulated_only() {
        return;
    }
    stays_when_the_target_fails(two_servers_with(|| isolated_config().expect("worker command")));
}

fn stays_when_the_target_fails((a, b, seed, want): (TestServer, TestServer, u64, Vec<u8>)) {
    let program = Program::start(&a, seed);
    program.steps(0, 2);
    // The target does not accept the token.
    let refused = migrate(&a, &b, "not-a-token").expect_err("refused");
    assert!(refused.to_string().contains("refused"), "{refused}");
    program.steps(2, 4);
    // The target is gone.
    let gone = b.migration_target(TOKEN);
    b.stop();
    let ids = a.migrator.sessions();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let unreachable = rt.block_on(a.migrator.migrate(ids[0], gone)).expect_err("unreachable");
    eprintln!("{refused}\n{unreachable}");
    program.steps(4, 6);
    assert!(program.result() == want, "results identical to the session that did not move");
    assert_eq!(a.migrator.sessions().len(), 1, "still on the source");
}
