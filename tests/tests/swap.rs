//! Lukewarm swap end to end (issue 21): a real server whose emulated
//! device holds less memory than its sessions together, and real client
//! sessions used in turns. Each session holds about 60 % of the device;
//! every turn swaps the others out and its own memory back in, and the
//! client sees only latency: the same addresses, the same bytes, correct
//! results. In-process and with every session in its own worker process
//! (the server's default), where the supervisor keeps the ledger.

use gpupool_client::{DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::BUILTIN_MODULE;
use gpupool_server::{DeviceChoice, Swap};
use gpupool_server::{MetricsSnapshot, ServerConfig};
use gpupool_tests::{TestServer, fresh_seed, isolated_config, random_f32, server_config};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// The emulated device's memory.
const DEVICE: u64 = 48 * MIB;
/// Floats in each of a session's two buffers: 14 MiB each, 28 MiB (58 %
/// of the device) a session.
const N: usize = (14 * MIB / 4) as usize;

/// Host memory for swapped contents, ample for all three sessions.
const HOST: u64 = 256 * MIB;

/// One session's buffers and what the client expects them to hold.
struct Tenant {
    session: Session,
    x: DeviceBuffer<f32>,
    y: DeviceBuffer<f32>,
    addrs: (u64, u64),
    host_x: Vec<f32>,
    want_y: Vec<f32>,
}

#[test]
fn sessions_that_do_not_fit_together_take_turns_with_correct_results() {
    take_turns(server_config(), None, HOST);
}

/// The same with a worker process per session: each worker's session asks
/// the supervisor for device memory, and the supervisor orders idle
/// workers to swap out. Each worker keeps its swap buffers as spares
/// (`--swap-spare-mib`), so its later swap-outs fill the buffers of its
/// earlier ones: the results stay right.
#[test]
fn sessions_in_worker_processes_take_turns_with_correct_results() {
    let mut config = isolated_config().expect("worker binary");
    config.swap_spare_bytes = 64 * MIB;
    take_turns(config, None, HOST);
}

/// Worker processes, each with a device of its own that holds all three
/// sessions: only the supervisor's bound makes them take turns.
#[test]
fn the_supervisors_bound_swaps_worker_sessions() {
    take_turns(isolated_config().expect("worker binary"), Some(DEVICE), HOST);
}

/// Host memory for one session's contents, disk for the rest: worker
/// sessions swapped past the host bound go to swap files (unlinked at
/// once: the directory stays empty), and come back byte for byte.
#[test]
fn sessions_past_the_host_bound_swap_to_disk() {
    let dir = std::env::temp_dir().join(format!("gpupool-swap-disk-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut config = isolated_config().expect("worker binary");
    config.swap_disk = Some(gpupool_server::SwapDisk { bytes: 256 * MIB, dir: dir.clone() });
    take_turns(config, None, 32 * MIB);
    assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0, "no swap file left");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The server's bound above what the device holds (as on a GPU whose
/// contexts and other processes take memory): the device's refusal is
/// what shows the pressure.
#[test]
fn a_device_refusal_below_the_bound_swaps_idle_sessions_out() {
    take_turns(server_config(), Some(1 << 30), HOST);
}

/// Three sessions of 28 MiB on the 48 MiB device, used in turns with the
/// server's device bound at `device_bytes` (the device's size by default).
fn take_turns(mut config: ServerConfig, device_bytes: Option<u64>, host_bytes: u64) {
    if std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda") {
        // The device is the emulated device of DEVICE bytes here.
        return;
    }
    let isolated = !matches!(config.isolation, gpupool_server::Isolation::InProcess);
    // In worker processes the device of each worker is its own: give each
    // room for all three, so that the supervisor's bound is what swaps.
    let device = if isolated && device_bytes.is_some() { 4 * DEVICE } else { DEVICE };
    config.device = DeviceChoice::Emulated { memory: device };
    config.memory_quota = 32 * MIB;
    config.swap = Some(Swap { device_bytes, host_bytes, wait: Duration::from_secs(20) });
    let srv = TestServer::start(config).expect("server starts");
    let seed = fresh_seed();

    let mut tenants: Vec<Tenant> = (0..3u64)
        .map(|i| {
            let session = Session::connect(&srv.client_config()).expect("session");
            let (hx, hy) = (random_f32(N, seed + 2 * i), random_f32(N, seed + 2 * i + 1));
            // The second and third sessions' allocations swap the others out.
            let x = DeviceBuffer::from_slice(&session, &hx).expect("x");
            let y = DeviceBuffer::from_slice(&session, &hy).expect("y");
            let addrs = (x.addr(), y.addr());
            Tenant { session, x, y, addrs, host_x: hx, want_y: hy }
        })
        .collect();
    // Workers report their counters every 200 ms.
    let swapped = settled(&srv, |m| m.memory_swapped >= 28 * MIB).memory_swapped;
    assert!(swapped >= 28 * MIB, "an earlier session was swapped out ({swapped} bytes)");

    for round in 0..2 {
        for (i, t) in tenants.iter_mut().enumerate() {
            let s = &t.session;
            let module = s.module_load(BUILTIN_MODULE).expect("builtin module");
            let saxpy = module.function("saxpy").expect("saxpy");
            let alpha = 0.5 + round as f32 + i as f32;
            let cfg = LaunchConfig::for_elements(N as u32, 256);
            let args = [KernelArg::F32(alpha), t.x.arg(), t.y.arg(), KernelArg::U32(N as u32)];
            s.launch(&saxpy, cfg, StreamId::DEFAULT, &args).expect("launch after swap-in");
            for (w, xv) in t.want_y.iter_mut().zip(&t.host_x) {
                *w = alpha.mul_add(*xv, *w);
            }
            let y = t.y.to_vec().expect("y");
            assert_eq!((t.x.addr(), t.y.addr()), t.addrs, "addresses never change");
            let wrong = y.iter().zip(&t.want_y).filter(|(a, b)| (**a - **b).abs() > 1e-5 * b.abs().max(1.0)).count();
            assert_eq!(wrong, 0, "session {i}, round {round}: {wrong} of {N} results differ");
        }
    }

    for t in &tenants {
        assert!(t.x.to_vec().expect("x") == t.host_x, "x came back byte for byte");
    }
    let all_reported =
        |m: &MetricsSnapshot| m.memory_mapped + m.memory_swapped == 3 * 28 * MIB && m.swapped_in_bytes >= 6 * 28 * MIB;
    let m = settled(&srv, all_reported);
    assert!(m.memory_mapped <= DEVICE, "resident {} within the device", m.memory_mapped);
    assert_eq!(m.memory_mapped + m.memory_swapped, 3 * 28 * MIB, "every byte is resident or swapped: {m:?}");
    assert_eq!(m.call_errors, 0, "the clients saw no error");
    // Each of the six turns brought its session's 28 MiB back.
    assert!(m.swapped_in_bytes >= 6 * 28 * MIB, "{m:?}");
    assert_eq!(m.swapped_out_bytes - m.swapped_in_bytes, m.memory_swapped, "{m:?}");
    drop(tenants);
}

/// The server's counters once `done` holds of them (worker processes
/// report theirs every 200 ms), or after 5 s as they are.
fn settled(srv: &TestServer, done: impl Fn(&MetricsSnapshot) -> bool) -> MetricsSnapshot {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = srv.metrics.snapshot();
        if done(&m) || Instant::now() >= deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
