//! Load and faults (issue 20): many clients at once for a while, a network
//! that loses, duplicates and reorders datagrams, and workers killed while
//! their sessions are busy. Every kernel result and every copied byte is
//! checked; nothing may be lost, repeated or silently wrong, and every
//! failure must be a clear error. Real QUIC, real server, real worker
//! processes, the emulated device.
//!
//! Sizes: `GPUPOOL_SOAK_CLIENTS` (default 64) clients for
//! `GPUPOOL_SOAK_SECS` (default 20) seconds; CI runs the defaults, a longer
//! run sets them (figures in `bench/results/*-soak.md`).

use gpupool_client::{ClientConfig, ClientError, DeviceBuffer, KernelArg, LaunchConfig, Module, Session, StreamId};
use gpupool_proto::BUILTIN_MODULE;
use gpupool_tests::relay::{Faults, Relay};
use gpupool_tests::{
    TestServer, alive, fresh_seed, isolated_config, random_bytes, random_f32, rel_error, server_config,
    short_idle_config, through_relay,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Held by the 64-client test and by the partition test, so that they
/// never run at once: on CI's 2 cores the partition test's connections
/// (a 3 s idle timeout) went unanswered for that long while the 64 clients
/// ran ("bulk connection ... no answer from the server within the idle
/// timeout", before the partition began).
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident memory of process `pid` in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib << 10)
}

/// The host's staged bytes and their cap, as the server's metrics endpoint
/// renders them.
fn staging(srv: &TestServer) -> (u64, u64) {
    let page = gpupool_server::server::exporter::render(&srv.metrics);
    let value = |name: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{page}"))
    };
    (value("gpupool_server_staging_host_bytes"), value("gpupool_server_staging_host_limit_bytes"))
}

/// What a client did.
#[derive(Debug, Default)]
struct Tally {
    rounds: AtomicU64,
    bytes_checked: AtomicU64,
    /// Clients that finished their first round.
    working: AtomicU64,
    /// Why clients failed, as they failed.
    failed: std::sync::Mutex<Vec<String>>,
}

/// One round of work with every result checked: a kernel and copies of an
/// inline, a mid-sized and a staged (bulk) size. Returns the bytes checked.
fn round(s: &Session, m: &Module, seed: u64) -> Result<u64, ClientError> {
    let n = 1_000 + (seed % 9_000) as usize;
    let (a, b) = (random_f32(n, seed), random_f32(n, seed ^ 0x55));
    let (da, db) = (DeviceBuffer::from_slice(s, &a)?, DeviceBuffer::from_slice(s, &b)?);
    let dc = DeviceBuffer::<f32>::new(s, n)?;
    let add = m.function("vector_add")?;
    let cfg = LaunchConfig::for_elements(n as u32, 256);
    s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), KernelArg::U32(n as u32)])?;
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(*x) + f64::from(*y)).collect();
    let got = dc.to_vec()?;
    assert!(rel_error(&got, &want) < 1e-6, "a kernel result differs");
    let mut checked = (n * 4) as u64;
    let size = [64, 60_000, 1_500_000][(seed % 3) as usize];
    let data = random_bytes(size, seed ^ 0xabc);
    let dev = s.mem_alloc(size as u64)?;
    s.memcpy_htod(dev, &data, StreamId::DEFAULT)?;
    let mut back = vec![0u8; size];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT)?;
    assert!(back == data, "{size} copied bytes differ");
    s.mem_free(dev)?;
    checked += size as u64;
    Ok(checked)
}

/// Runs rounds on `s` until `stop`; the first error ends it.
fn work_until(s: &Session, stop: &AtomicBool, tally: &Tally, seed: u64) -> Result<(), ClientError> {
    let m = s.module_load(BUILTIN_MODULE)?;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let bytes = round(s, &m, seed.wrapping_add(i.wrapping_mul(7919)))?;
        tally.rounds.fetch_add(1, Ordering::Relaxed);
        tally.bytes_checked.fetch_add(bytes, Ordering::Relaxed);
        if i == 0 {
            tally.working.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
    }
    s.synchronize()
}

/// A thread per configuration, each a client working until `stop`, the
/// `i`-th with the seed `seed + i * stride`.
fn spawn_clients(
    configs: Vec<ClientConfig>,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
    seed: u64,
    stride: u64,
) -> Vec<std::thread::JoinHandle<Result<(), ClientError>>> {
    configs
        .into_iter()
        .enumerate()
        .map(|(i, config)| {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || -> Result<(), ClientError> {
                let worked = Session::connect(&config)
                    .and_then(|s| work_until(&s, &stop, &tally, seed.wrapping_add(i as u64 * stride)));
                if let Err(e) = &worked {
                    tally.failed.lock().unwrap_or_else(|e| e.into_inner()).push(format!("client {i}: {e}"));
                }
                worked
            })
        })
        .collect()
}

/// Joins the client threads: a client that failed fails the test.
fn join_clients(threads: Vec<std::thread::JoinHandle<Result<(), ClientError>>>) {
    for (i, t) in threads.into_iter().enumerate() {
        t.join().expect("client thread").unwrap_or_else(|e| panic!("client {i} failed: {e}"));
    }
}

/// Waits until `n` clients finished their first round (60 s at most).
fn wait_working(tally: &Tally, n: u64) {
    let t = Instant::now();
    while tally.working.load(Ordering::Relaxed) < n {
        let failed = tally.failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(failed.is_empty(), "a client failed before every client got work done: {failed:?}");
        assert!(t.elapsed() < Duration::from_secs(60), "not every client got work done");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn many_clients_for_a_while_every_reply_checked() {
    let _alone = HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let clients = env_or("GPUPOOL_SOAK_CLIENTS", 64) as usize;
    let secs = env_or("GPUPOOL_SOAK_SECS", 20);
    let mut config = isolated_config().expect("worker binary");
    config.max_sessions = clients;
    // As the clients' connect timeout below: 64 handshakes at once on 2
    // cores may take longer than the default 10 s.
    config.handshake_timeout = Duration::from_secs(30);
    let srv = TestServer::start(config).expect("server starts");
    let supervisor_before = rss(std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let started = Instant::now();
    let mut config = srv.client_config();
    // 64 workers start at once: on 2 cores at a load of ~100 one may take
    // longer than the default 10 s to answer its first client.
    config.connect_timeout = Duration::from_secs(30);
    // And a connection may go unanswered longer than the client's default
    // 10 s idle timeout (seen once in CI, 2026-12-07, with a compile
    // beside the test): the server's own bound, 30 s, is what this load
    // test holds the clients to.
    config.idle_timeout = Duration::from_secs(30);
    let threads = spawn_clients(vec![config; clients], &stop, &tally, seed, 1_000_003);
    // Memory while the load runs: each worker and the supervisor (this
    // process) stay bounded.
    let mut worker_peak = 0;
    let mut staged_peak = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        worker_peak = srv.workers().iter().map(|w| rss(w.pid)).max().unwrap_or(0).max(worker_peak);
        staged_peak = staged_peak.max(staging(&srv).0);
    }
    stop.store(true, Ordering::Relaxed);
    join_clients(threads);
    // The host's staging stayed under its cap, and nothing stays staged
    // once the sessions are gone.
    let (_, cap) = staging(&srv);
    assert!(staged_peak <= cap, "staged {staged_peak} bytes past the cap of {cap}");
    let t = Instant::now();
    while staging(&srv).0 > 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "{} bytes still staged after the sessions", staging(&srv).0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (rounds, bytes) = (tally.rounds.load(Ordering::Relaxed), tally.bytes_checked.load(Ordering::Relaxed));
    let supervisor_growth = rss(std::process::id()).saturating_sub(supervisor_before);
    println!(
        "soak: {clients} clients, {:.1} s, {rounds} rounds, {bytes} bytes checked, worker RSS peak {} MiB, \
         supervisor (test process) RSS growth {} MiB, host staging peak {} KiB (sampled every 0.5 s)",
        started.elapsed().as_secs_f64(),
        worker_peak >> 20,
        supervisor_growth >> 20,
        staged_peak >> 10
    );
    assert!(rounds >= clients as u64, "every client finished rounds ({rounds})");
    assert!(worker_peak < 1 << 30, "a worker grew to {} MiB", worker_peak >> 20);
    // The test process holds the supervisor and every client's buffers.
    assert!(supervisor_growth < 2 << 30, "the supervisor grew by {} MiB", supervisor_growth >> 20);
    srv.stop();
}

#[test]
fn a_network_that_loses_duplicates_and_reorders_loses_nothing() {
    // In-process sessions: the relay cannot follow a redirect to a worker.
    let srv = TestServer::start(server_config()).expect("server starts");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let relays: Vec<_> = (0..4)
        .map(|i| {
            let faults = Faults { loss: 0.03, duplicate: 0.02, reorder: 0.05, seed: seed.wrapping_add(i) };
            Relay::with_faults(srv.addr, faults)
        })
        .collect();
    let configs = relays
        .iter()
        .map(|relay| {
            let mut config = srv.client_config();
            config.server = relay.addr;
            config
        })
        .collect();
    let threads = spawn_clients(configs, &stop, &tally, seed, 31);
    std::thread::sleep(Duration::from_secs(env_or("GPUPOOL_FAULT_SECS", 8)));
    stop.store(true, Ordering::Relaxed);
    join_clients(threads);
    let c = |f: fn(&gpupool_tests::relay::FaultCounts) -> &AtomicU64| {
        relays.iter().map(|r| f(&r.counts).load(Ordering::Relaxed)).sum::<u64>()
    };
    let (dropped, duplicated, reordered) = (c(|x| &x.dropped), c(|x| &x.duplicated), c(|x| &x.reordered));
    println!(
        "faults: {} rounds, {} bytes checked; {dropped} datagrams dropped, {duplicated} duplicated, {reordered} reordered",
        tally.rounds.load(Ordering::Relaxed),
        tally.bytes_checked.load(Ordering::Relaxed)
    );
    assert!(tally.rounds.load(Ordering::Relaxed) >= 4, "work got through");
    assert!(dropped > 0 && duplicated > 0 && reordered > 0, "the faults happened");
    srv.stop();
}

#[test]
fn a_partition_longer_than_the_idle_timeout_under_load_loses_nothing() {
    let _alone = HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // In-process sessions (the relay cannot follow a redirect to a worker);
    // both ends time out after 3 s (1 s timed out spuriously while this
    // test shared 2 cores with the others of this file in CI), the server
    // keeps lost sessions 20 s.
    const IDLE: Duration = Duration::from_secs(3);
    let mut config = short_idle_config(Duration::from_secs(20));
    config.idle_timeout = IDLE;
    let srv = TestServer::start(config).expect("server starts");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let relays: Vec<_> = (0..4).map(|_| Relay::start(srv.addr)).collect();
    let configs = relays
        .iter()
        .map(|relay| {
            let mut c = through_relay(srv.client_config(), relay.addr);
            c.idle_timeout = IDLE;
            c
        })
        .collect();
    let threads = spawn_clients(configs, &stop, &tally, seed, 131);
    wait_working(&tally, 4);
    // Every datagram dropped for longer than the idle timeout: the
    // connections time out mid-work (a round's copies and kernels in
    // flight) and are resumed.
    for relay in &relays {
        relay.pause(true);
    }
    std::thread::sleep(IDLE + Duration::from_millis(1500));
    let before = tally.rounds.load(Ordering::Relaxed);
    for relay in &relays {
        relay.pause(false);
    }
    let t = Instant::now();
    while tally.rounds.load(Ordering::Relaxed) < before + 8 {
        assert!(t.elapsed() < Duration::from_secs(60), "work did not go on after the partition");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    join_clients(threads);
    let m = srv.metrics.snapshot();
    println!(
        "partition: {} rounds checked, {} resumptions, {} sessions opened",
        tally.rounds.load(Ordering::Relaxed),
        m.resumptions,
        m.sessions_opened
    );
    assert_eq!(m.sessions_opened, 4, "the sessions were resumed, not opened again: {m:?}");
    assert!(m.resumptions >= 4, "every client resumed its session: {m:?}");
    srv.stop();
}

#[test]
fn workers_killed_under_load_end_only_their_sessions_with_a_clear_error() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let sessions: Vec<Session> = (0..6).map(|_| Session::connect(&srv.client_config()).expect("session")).collect();
    let pids: Vec<u32> = sessions
        .iter()
        .map(|s| {
            let id = s.welcome().session_id;
            srv.workers().iter().find(|w| w.session == Some(id)).map(|w| w.pid).expect("a worker serves it")
        })
        .collect();
    let threads: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || work_until(&s, &stop, &tally, seed.wrapping_add(i as u64 * 17)))
        })
        .collect();
    wait_working(&tally, 6);
    for pid in &pids[..2] {
        let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill runs");
        assert!(status.success());
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, t) in threads.into_iter().enumerate() {
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "client {i} hangs after its worker was killed");
            std::thread::sleep(Duration::from_millis(50));
        }
        let result = t.join().expect("client thread");
        if i < 2 {
            let e = result.expect_err("a killed worker's session fails");
            assert!(matches!(e, ClientError::ConnectionLost(_)), "client {i}: {e:?}");
            assert!(e.to_string().contains("worker"), "says what failed: {e}");
        } else {
            result.unwrap_or_else(|e| panic!("client {i} (worker alive) failed: {e}"));
        }
    }
    // The server still serves new sessions.
    let s = Session::connect(&srv.client_config()).expect("a new session after the kills");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    round(&s, &m, seed).expect("a round on the new session");
    println!("kills: {} rounds checked around 2 killed workers", tally.rounds.load(Ordering::Relaxed));
    srv.stop();
}

/// Set in the child process that serves as the supervisor of
/// [`a_killed_supervisor_takes_its_workers_with_it_and_clients_are_told`]:
/// this test binary run again, with only [`supervisor_child`] selected.
const SUPERVISOR_CHILD: &str = "GPUPOOL_SOAK_SUPERVISOR_CHILD";

/// In the child (see [`SUPERVISOR_CHILD`]): a real server in process
/// isolation, its address and fingerprint on stdout, until killed.
/// Elsewhere it returns at once.
#[test]
fn supervisor_child() {
    if std::env::var_os(SUPERVISOR_CHILD).is_none() {
        return;
    }
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    println!("SUPERVISOR {} {}", srv.addr, srv.fingerprint);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Pids of the processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

#[test]
fn a_killed_supervisor_takes_its_workers_with_it_and_clients_are_told() {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", "supervisor_child", "--nocapture", "--test-threads", "1"])
        .env(SUPERVISOR_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the supervisor process starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (addr, pin) = loop {
        let line = lines.next().expect("the supervisor prints its address").expect("a line");
        // libtest's "test supervisor_child ... " may start the line.
        if let Some(rest) = line.split("SUPERVISOR ").nth(1) {
            let mut words = rest.split_whitespace();
            let addr: std::net::SocketAddr = words.next().and_then(|a| a.parse().ok()).expect("an address");
            break (addr, words.next().expect("a fingerprint").to_owned());
        }
    };
    // Keep reading so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let mut config =
        gpupool_client::ClientConfig::new(addr, gpupool_client::Trust::Fingerprint(pin), gpupool_tests::TOKEN);
    config.reply_timeout = Duration::from_secs(60);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let (config, stop, tally) = (config.clone(), stop.clone(), tally.clone());
            std::thread::spawn(move || -> Result<(), ClientError> {
                let s = Session::connect(&config)?;
                work_until(&s, &stop, &tally, seed.wrapping_add(i))
            })
        })
        .collect();
    let supervisor = child.id();
    wait_working(&tally, 3);
    let workers = children(supervisor);
    assert!(workers.len() >= 3, "workers {workers:?}");
    let killed = Instant::now();
    child.kill().expect("SIGKILL the supervisor");
    child.wait().expect("reaped");
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, t) in threads.into_iter().enumerate() {
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "client {i} hangs after the supervisor died");
            std::thread::sleep(Duration::from_millis(50));
        }
        let e = t.join().expect("client thread").expect_err("the session ends with its server");
        println!("client {i} after {:.2} s: {e}", killed.elapsed().as_secs_f64());
        assert!(matches!(e, ClientError::ConnectionLost(_) | ClientError::Timeout(_)), "client {i}: {e:?}");
    }
    let told = killed.elapsed();
    // Told by the worker closing its connections (0.15-0.4 s). Until
    // 2026-12-05 about 1 run of 4 had a client learn it only from its idle
    // timeout and a failed resume (10-21 s); not seen in 21 runs since
    // (docs/next-steps.md), so the bound stays loose until the cause is
    // known.
    assert!(told < Duration::from_secs(60), "clients learned of it after {told:?}");
    // Orphaned workers see stdin close and exit: no device memory is left held.
    while workers.iter().any(|&pid| alive(pid)) {
        assert!(Instant::now() < deadline, "workers outlived their supervisor: {workers:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "supervisor: killed after {} rounds; its 3 clients told {:.2} s and its {} workers gone {:.2} s later",
        tally.rounds.load(Ordering::Relaxed),
        told.as_secs_f64(),
        workers.len(),
        killed.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
}

/// Set in the child process that serves as the balancer of
/// [`a_balancer_killed_under_load_loses_no_session`]: `PORT DIR`, where
/// DIR holds the certificate and key it serves with (the same across its
/// restarts, so that clients' pins hold).
const BALANCER_CHILD: &str = "GPUPOOL_SOAK_BALANCER_CHILD";

/// In the child (see [`BALANCER_CHILD`]): a balancer on the given port with
/// a fixed signing key, its public key on stdout, until killed. Elsewhere it
/// returns at once.
#[test]
fn balancer_child() {
    let Some(arg) = std::env::var_os(BALANCER_CHILD) else { return };
    let arg = arg.into_string().expect("a UTF-8 argument");
    let (port, dir) = arg.split_once(' ').expect("PORT DIR");
    let dir = std::path::Path::new(dir);
    let chain = vec![std::fs::read(dir.join("cert.der")).expect("certificate")];
    let key = std::fs::read(dir.join("key.der")).expect("key");
    let mut c = gpupool_tests::balancer_config(gpupool_proto::lease::LeaseSigner::from_seed([7; 32]));
    c.listen = ([127, 0, 0, 1], port.parse().expect("a port")).into();
    c.tls = Some(gpupool_balancer::TlsSettings {
        identity: gpupool_proto::tls::TlsSource::Der { chain, key },
        server_client_ca: None,
    });
    // After a restart, leases held come back before anything new is granted.
    // A lease's life long: on a loaded 2-core machine a renewal or a
    // server's heartbeat came later than 1.5 s after the restart once, and
    // the lease it would have brought back was ended.
    c.pool.recovery_ms = 3_000;
    let b = gpupool_tests::TestBalancer::start(c).expect("balancer starts");
    println!("BALANCER {}", b.public_key);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A child process killed (and reaped) when this drops, also when the test
/// fails half-way: no balancer is left behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the balancer child on `port` with the identity in `dir`; its
/// process and public key.
fn start_balancer(port: u16, dir: &std::path::Path) -> (KillOnDrop, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", "balancer_child", "--nocapture", "--test-threads", "1"])
        .env(BALANCER_CHILD, format!("{port} {}", dir.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the balancer process starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let key = loop {
        let line = lines.next().expect("the balancer prints its key").expect("a line");
        if let Some(key) = line.split("BALANCER ").nth(1) {
            break key.trim().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (KillOnDrop(child), key)
}

/// Issue 20, "kill -9 of the balancer mid-load": the balancer only grants
/// and renews leases, so its death stops no session. Three clients on
/// leases work without pause while it is killed with SIGKILL and started
/// again on the same port (same certificate and signing key); every round
/// stays correct, no client sees an error, the restarted balancer takes
/// the three leases back from their holders, and renewals go on.
#[test]
fn a_balancer_killed_under_load_loses_no_session() {
    let dir = std::env::temp_dir().join(format!("gpupool-soak-balancer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let names = vec!["localhost".into(), "127.0.0.1".into()];
    let identity = gpupool_proto::tls::Identity::load(&gpupool_proto::tls::TlsSource::SelfSigned { names })
        .expect("a certificate");
    let fingerprint = identity.fingerprint();
    let (chain, key) = identity.to_der();
    std::fs::write(dir.join("cert.der"), &chain[0]).expect("write the certificate");
    std::fs::write(dir.join("key.der"), &key).expect("write the key");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();

    let (mut first, lease_key) = start_balancer(port, &dir);
    let url = format!("https://127.0.0.1:{port}");
    let trust = gpupool_proto::grpc_tls::BalancerTrust::Fingerprint(
        gpupool_proto::tls::parse_fingerprint(&fingerprint).expect("fingerprint"),
    );
    let link = gpupool_server::BalancerLink {
        url: url.clone(),
        trust: trust.clone(),
        client_identity: None,
        server_id: "soak".into(),
        advertise: "127.0.0.1:0".into(),
        secret: gpupool_tests::SERVER_SECRET.into(),
        lease_key,
    };
    let _server = gpupool_tests::linked_server(link, "h100-80gb,h100-80gb,h100-80gb", None);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seed = fresh_seed();
    let threads: Vec<_> = (0..3u64)
        .map(|i| {
            let (stop, tally) = (stop.clone(), tally.clone());
            let mut req = gpupool_client::PoolRequest::new(url.clone(), trust.clone(), "soak");
            req.wait = Duration::from_secs(30);
            std::thread::spawn(move || -> Result<u64, ClientError> {
                let mut template = gpupool_client::ClientConfig::for_leases();
                template.reply_timeout = Duration::from_secs(60);
                let s = Session::connect_pooled(&req, &template)?;
                work_until(&s, &stop, &tally, seed.wrapping_add(i))?;
                Ok(s.lease().expect("leased").expires_unix_ms)
            })
        })
        .collect();
    let t = Instant::now();
    while tally.working.load(Ordering::Relaxed) < 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "not every client got work done");
        assert!(!threads.iter().any(std::thread::JoinHandle::is_finished), "a client ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = tally.rounds.load(Ordering::Relaxed);
    first.0.kill().expect("SIGKILL the balancer");
    first.0.wait().expect("reaped");
    let killed = Instant::now();
    let killed_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    // Down for longer than a renewal interval (leases live 3 s, clients
    // renew every 1 s): renewals fail meanwhile, sessions go on.
    std::thread::sleep(Duration::from_millis(1_500));
    let during = tally.rounds.load(Ordering::Relaxed) - before;
    let (second, _) = start_balancer(port, &dir);
    // Past the recovery window and a few renewals.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let renewed_after: Vec<u64> = threads
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.join().expect("client thread").unwrap_or_else(|e| panic!("client {i}: {e}")))
        .collect();
    let restarted_at = killed.elapsed();
    assert!(during > 0, "no work got done while the balancer was down");
    // A lease last renewed before the kill expires within a lease's life
    // (3 s) of it; one renewed by the restarted balancer later.
    for (i, expires) in renewed_after.iter().enumerate() {
        assert!(*expires > killed_unix_ms + 3_000, "client {i}'s lease was not renewed after the restart");
    }
    println!(
        "balancer: killed after {before} rounds; {during} rounds in the 1.5 s it was down; \
         {} rounds in all, every lease renewed after the restart ({:.1} s after the kill)",
        tally.rounds.load(Ordering::Relaxed),
        restarted_at.as_secs_f64()
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}
