//! The `WorkerSpec` a supervisor sends each worker process it starts: its
//! [`ServerConfig`] as the wire carries it, and back. Shared by the
//! supervisor ([`crate::server`]) and the worker ([`crate::worker`]).

use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::tls::TlsSource;
use gpupool_proto::v1;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The worker's server configuration from the supervisor's spec.
pub(crate) fn config_from_spec(spec: &v1::WorkerSpec) -> Result<ServerConfig, ServerError> {
    let ip: IpAddr = spec
        .listen_ip
        .parse()
        .map_err(|_| ServerError::Config(format!("bad worker listen IP {:?}", spec.listen_ip)))?;
    let mut c = ServerConfig::new(SocketAddr::new(ip, 0), Vec::new());
    c.device = spec.device.parse().map_err(|_| ServerError::Config(format!("bad worker device {:?}", spec.device)))?;
    c.tls =
        TlsSource::Der { chain: spec.cert_chain_der.iter().map(|c| c.to_vec()).collect(), key: spec.key_der.to_vec() };
    c.max_sessions = 1;
    c.one_session = true;
    c.memory_quota = spec.memory_quota;
    c.max_inline_bytes = spec.max_inline_bytes;
    c.max_frame_bytes = spec.max_frame_bytes;
    c.max_staging_bytes = spec.max_staging_bytes;
    c.max_handles = spec.max_handles as usize;
    c.max_bulk_streams = spec.max_bulk_streams as usize;
    c.bulk_endpoints = spec.bulk_endpoints as usize;
    c.shm_dir = Some(spec.shm_dir.clone()).filter(|d| !d.is_empty()).map(Into::into);
    // A worker's sessions stay on QUIC (docs/rdma.md): no listener, no
    // device probe in every worker process.
    c.rdma.mode = crate::config::RdmaMode::Off;
    c.batch_queue = spec.batch_queue as usize;
    c.max_queued_batch_bytes = spec.max_queued_batch_bytes;
    c.swap_spare_bytes = spec.swap_spare_bytes;
    c.image_cache_dir = Some(spec.image_cache_dir.clone()).filter(|d| !d.is_empty()).map(Into::into);
    c.image_cache_bytes = spec.image_cache_bytes;
    c.image_cache_disk_bytes = spec.image_cache_disk_bytes;
    c.image_preload_bytes = spec.image_preload_bytes;
    c.idle_timeout = Duration::from_millis(spec.idle_timeout_ms);
    c.max_udp_payload = u16::try_from(spec.max_udp_payload)
        .map_err(|_| ServerError::Config(format!("max_udp_payload {} too large", spec.max_udp_payload)))?;
    c.handshake_timeout = Duration::from_millis(spec.handshake_timeout_ms);
    c.compression = spec.compression;
    c.resume_grace = Duration::from_millis(spec.resume_grace_ms);
    c.session_spin = Duration::from_micros(u64::from(spec.session_spin_us));
    c.io_spin = Duration::from_micros(u64::from(spec.io_spin_us));
    c.migrate_precopy_bytes = spec.migrate_precopy_bytes;
    if let Some(n) = spec.eager_describe_max {
        c.eager_describe_max = n as usize;
    }
    c.host_facts = spec.host_facts.clone();
    if spec.port_low != 0 {
        let port =
            |p: u32| u16::try_from(p).map_err(|_| ServerError::Config(format!("worker port {p} is not a UDP port")));
        c.worker_ports = Some((port(spec.port_low)?, port(spec.port_high)?));
    }
    c.validate()?;
    Ok(c)
}

/// The spec a supervisor with `config` sends its workers.
pub(crate) fn spec_from_config(config: &ServerConfig, chain: Vec<Vec<u8>>, key: Vec<u8>) -> v1::WorkerSpec {
    v1::WorkerSpec {
        device: config.device.to_string(),
        listen_ip: config.listen.ip().to_string(),
        cert_chain_der: chain.into_iter().map(Into::into).collect(),
        key_der: key.into(),
        memory_quota: config.memory_quota,
        max_inline_bytes: config.max_inline_bytes,
        max_frame_bytes: config.max_frame_bytes,
        max_staging_bytes: config.max_staging_bytes,
        max_handles: config.max_handles as u32,
        max_bulk_streams: config.max_bulk_streams as u32,
        bulk_endpoints: config.bulk_endpoints as u32,
        shm_dir: config.shm_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
        batch_queue: config.batch_queue as u32,
        max_queued_batch_bytes: config.max_queued_batch_bytes,
        image_cache_dir: config.image_cache_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
        image_cache_bytes: config.image_cache_bytes,
        image_cache_disk_bytes: config.image_cache_disk_bytes,
        image_preload_bytes: config.image_preload_bytes,
        idle_timeout_ms: config.idle_timeout.as_millis() as u64,
        max_udp_payload: u32::from(config.max_udp_payload),
        handshake_timeout_ms: config.handshake_timeout.as_millis() as u64,
        compression: config.compression,
        resume_grace_ms: config.resume_grace.as_millis() as u64,
        session_spin_us: u32::try_from(config.session_spin.as_micros()).unwrap_or(u32::MAX),
        io_spin_us: u32::try_from(config.io_spin.as_micros()).unwrap_or(u32::MAX),
        port_low: config.worker_ports.map_or(0, |(low, _)| u32::from(low)),
        port_high: config.worker_ports.map_or(0, |(_, high)| u32::from(high)),
        swap: config.swap.is_some(),
        swap_wait_ms: config.swap.map_or(0, |s| u64::try_from(s.wait.as_millis()).unwrap_or(u64::MAX)),
        swap_dir: config.swap_disk.as_ref().map(|d| d.dir.display().to_string()).unwrap_or_default(),
        swap_spare_bytes: config.swap_spare_bytes,
        migrate_precopy_bytes: config.migrate_precopy_bytes,
        eager_describe_max: Some(u32::try_from(config.eager_describe_max).unwrap_or(u32::MAX)),
        host_facts: config.host_facts.clone(),
        // Set per worker by its pool, with the slot it gets.
        staging_ledger_fd: 0,
        staging_slot: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeviceChoice;

    #[test]
    fn spec_round_trips_the_config() {
        let mut c = ServerConfig::new("127.0.0.1:0".parse().expect("addr"), vec!["t".into()]);
        c.device = DeviceChoice::Emulated { memory: 1 << 30 };
        c.image_cache_dir = Some("/tmp/images".into());
        c.max_queued_batch_bytes = 8 << 20;
        c.swap_spare_bytes = 3 << 30;
        c.eager_describe_max = 0;
        c.host_facts = Some(v1::HostFacts {
            kernel_driver_version: "580.159.04".into(),
            pcie_by_bus_id: [(
                "00000000:1B:00.0".to_string(),
                v1::PcieLink { max_generation: 5, ..Default::default() },
            )]
            .into(),
        });
        let back = config_from_spec(&spec_from_config(&c, vec![vec![1, 2]], vec![3])).expect("valid");
        assert_eq!(back.device, c.device);
        assert_eq!(back.memory_quota, c.memory_quota);
        assert_eq!(back.image_cache_dir, c.image_cache_dir);
        assert_eq!(back.idle_timeout, c.idle_timeout);
        assert_eq!(back.bulk_endpoints, c.bulk_endpoints);
        assert_eq!(back.shm_dir, c.shm_dir);
        assert_eq!(back.migrate_precopy_bytes, c.migrate_precopy_bytes);
        assert_eq!(back.eager_describe_max, c.eager_describe_max);
        assert_eq!(back.host_facts, c.host_facts);
        assert_eq!(back.max_queued_batch_bytes, 8 << 20);
        assert_eq!(back.swap_spare_bytes, 3 << 30);
        c.shm_dir = None;
        assert_eq!(config_from_spec(&spec_from_config(&c, vec![vec![1]], vec![3])).expect("valid").shm_dir, None);
        assert!(back.one_session && back.max_sessions == 1);
        assert_eq!(back.rdma.mode, crate::config::RdmaMode::Off, "workers stay on QUIC");
        let mut bad = spec_from_config(&c, vec![], vec![]);
        bad.device = "gpu".into();
        assert!(config_from_spec(&bad).expect_err("bad device").to_string().contains("bad worker device \"gpu\""));
    }
}
