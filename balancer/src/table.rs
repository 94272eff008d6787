//! The operator's view: a pool status as plain-text tables.

use gpupool_proto::balancer as pb;
use std::collections::HashMap;
use std::fmt::Write;

/// Left-aligned columns, two spaces apart.
fn render_table(out: &mut String, title: &str, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "{title}");
    if rows.is_empty() {
        let _ = writeln!(out, "  (none)\n");
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::from(" ");
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(s, " {cell:<w$} ");
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(out, &mut header.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
    out.push('\n');
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn short(uuid: &str) -> String {
    if uuid.chars().count() > 20 { format!("{}…", uuid.chars().take(19).collect::<String>()) } else { uuid.into() }
}

/// `status` as tables: servers, instances, leases, queue. `now_unix_ms`
/// turns expiry times into "in N s". A tenant's view (`status.tenant`) has
/// its leases and queue only.
pub fn render(status: &pb::PoolStatus, now_unix_ms: u64) -> String {
    let mut out = String::new();
    if !status.tenant.is_empty() {
        let _ = writeln!(
            out,
            "tenant {} · policy {} · {} leases · {} queued{}\n",
            status.tenant,
            status.policy,
            status.leases.len(),
            status.queue.len(),
            if status.recovering { " · RECOVERING (no new leases yet)" } else { "" },
        );
        leases_and_queue(&mut out, status, now_unix_ms);
        return out;
    }
    let holders: HashMap<&str, &pb::LeaseStatus> =
        status.leases.iter().map(|l| (l.instance_uuid.as_str(), l)).collect();
    let _ = writeln!(
        out,
        "policy {} · {} servers · {} leases · {} queued{} · allocations {} releases {} expirations {} queue timeouts {}\n",
        status.policy,
        status.servers.len(),
        status.leases.len(),
        status.queue.len(),
        if status.recovering { " · RECOVERING (no new leases yet)" } else { "" },
        status.allocations,
        status.releases,
        status.expirations,
        status.queue_timeouts,
    );
    let servers: Vec<Vec<String>> = status
        .servers
        .iter()
        .map(|s| {
            let instances: Vec<&pb::Instance> = s.gpus.iter().flat_map(|g| &g.instances).collect();
            let leased = instances.iter().filter(|i| holders.contains_key(i.uuid.as_str())).count();
            let id = if s.draining { format!("{} (draining)", s.server_id) } else { s.server_id.clone() };
            vec![
                id,
                s.address.clone(),
                s.gpus.len().to_string(),
                format!("{leased}/{}", instances.len()),
                s.sessions.to_string(),
                gib(s.memory_used_bytes),
                format!("{:.1} s", s.heartbeat_age_ms as f64 / 1000.0),
                s.mps_group_faults.to_string(),
            ]
        })
        .collect();
    render_table(
        &mut out,
        "SERVERS",
        &["server", "address", "gpus", "leased", "sessions", "memory used", "heartbeat", "group faults"],
        &servers,
    );
    let mut instances = Vec::new();
    for s in &status.servers {
        let classes: HashMap<&str, &pb::GpuLeases> = s.gpu_leases.iter().map(|g| (g.uuid.as_str(), g)).collect();
        for g in &s.gpus {
            for i in &g.instances {
                let holder = holders.get(i.uuid.as_str());
                // Shared leases hold a whole GPU together (issue 19).
                let shared = classes.get(i.uuid.as_str()).filter(|c| c.shared > 0);
                instances.push(vec![
                    s.server_id.clone(),
                    format!("{} {}", g.index, g.name),
                    short(&i.uuid),
                    i.profile.as_ref().map_or_else(|| "whole GPU".into(), |p| format!("{} ({})", p.name, p.id)),
                    i.profile
                        .as_ref()
                        .map_or_else(|| "-".into(), |_| format!("{}:{}", i.placement_start, i.placement_size)),
                    gib(i.memory_bytes),
                    i.multiprocessors.to_string(),
                    match (shared, holder) {
                        (Some(c), _) => format!(
                            "shared: {} leases, {}% placed, busy {:.1}%",
                            c.shared,
                            c.shared_percent,
                            f64::from(c.busy_permille) / 10.0
                        ),
                        (None, Some(l)) => format!("{:#x} ({})", l.lease_id, l.tenant),
                        (None, None) => "free".into(),
                    },
                ]);
            }
        }
    }
    render_table(
        &mut out,
        "INSTANCES",
        &["server", "gpu", "instance", "profile", "placement", "memory", "SMs", "lease"],
        &instances,
    );
    leases_and_queue(&mut out, status, now_unix_ms);
    out
}

fn leases_and_queue(out: &mut String, status: &pb::PoolStatus, now_unix_ms: u64) {
    let leases: Vec<Vec<String>> = status
        .leases
        .iter()
        .map(|l| {
            let left = l.expires_unix_ms.saturating_sub(now_unix_ms);
            vec![
                format!("{:#x}", l.lease_id),
                l.tenant.clone(),
                l.server_id.clone(),
                short(&l.instance_uuid),
                gib(l.memory_bytes),
                match l.class() {
                    pb::LeaseClass::Exclusive => "exclusive".into(),
                    pb::LeaseClass::Shared => format!("shared {}%", l.compute_percent),
                },
                format!("in {:.1} s", left as f64 / 1000.0),
                if l.in_use { "yes".into() } else { "no".into() },
            ]
        })
        .collect();
    render_table(
        out,
        "LEASES",
        &["lease", "tenant", "server", "instance", "memory", "class", "expires", "in use"],
        &leases,
    );
    // Sessions that did not move at their last order, and why.
    let refused: Vec<Vec<String>> = status
        .leases
        .iter()
        .filter(|l| !l.move_refused.is_empty())
        .map(|l| vec![format!("{:#x}", l.lease_id), l.server_id.clone(), l.move_refused.clone()])
        .collect();
    if !refused.is_empty() {
        render_table(out, "NOT MOVED", &["lease", "stays on", "why"], &refused);
    }
    let queue: Vec<Vec<String>> = status
        .queue
        .iter()
        .enumerate()
        .map(|(n, q)| {
            vec![
                (n + 1).to_string(),
                q.tenant.clone(),
                gib(q.memory_bytes),
                if q.compute_percent == 0 { "any".into() } else { format!("{}%", q.compute_percent) },
                if q.profile.is_empty() { "any".into() } else { q.profile.clone() },
                format!("{:.1} s", q.waited_ms as f64 / 1000.0),
            ]
        })
        .collect();
    render_table(out, "QUEUE", &["#", "tenant", "memory", "compute", "profile", "waited"], &queue);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_show_servers_instances_leases_and_queue() {
        let status = pb::PoolStatus {
            servers: vec![pb::ServerStatus {
                server_id: "gpu-a".into(),
                address: "10.0.0.7:4433".into(),
                gpus: vec![pb::Gpu {
                    uuid: "GPU-1".into(),
                    name: "NVIDIA H100 80GB HBM3".into(),
                    index: 0,
                    memory_bytes: 80 << 30,
                    multiprocessors: 132,
                    mig_enabled: true,
                    instances: vec![
                        pb::Instance {
                            uuid: "MIG-a".into(),
                            profile: Some(pb::MigProfile { id: 9, name: "3g.40gb".into() }),
                            memory_bytes: 40 << 30,
                            multiprocessors: 60,
                            placement_start: 0,
                            placement_size: 4,
                        },
                        pb::Instance {
                            uuid: "MIG-b".into(),
                            profile: Some(pb::MigProfile { id: 9, name: "3g.40gb".into() }),
                            memory_bytes: 40 << 30,
                            multiprocessors: 60,
                            placement_start: 4,
                            placement_size: 4,
                        },
                    ],
                }],
                sessions: 1,
                memory_used_bytes: 40 << 30,
                heartbeat_age_ms: 1200,
                draining: false,
                mps_group_faults: 1,
                gpu_leases: vec![],
            }],
            leases: vec![pb::LeaseStatus {
                lease_id: 0xabc,
                tenant: "team-a".into(),
                server_id: "gpu-a".into(),
                instance_uuid: "MIG-a".into(),
                memory_bytes: 40 << 30,
                expires_unix_ms: 31_000,
                in_use: true,
                ..Default::default()
            }],
            queue: vec![pb::QueuedRequest {
                tenant: "team-b".into(),
                memory_bytes: 80 << 30,
                compute_percent: 0,
                profile: String::new(),
                waited_ms: 500,
                ..Default::default()
            }],
            policy: "spread".into(),
            ..Default::default()
        };
        let text = render(&status, 1_000);
        for needle in
            ["SERVERS", "gpu-a", "1/2", "3g.40gb (9)", "0:4", "0xabc (team-a)", "free", "in 30.0 s", "team-b", "0.5 s"]
        {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn a_shared_gpu_shows_its_leases_share_and_busy_time() {
        let gpu = pb::Gpu {
            uuid: "GPU-9".into(),
            name: "NVIDIA H200".into(),
            memory_bytes: 141 << 30,
            multiprocessors: 132,
            instances: vec![pb::Instance {
                uuid: "GPU-9".into(),
                memory_bytes: 141 << 30,
                multiprocessors: 132,
                ..Default::default()
            }],
            ..Default::default()
        };
        let lease = |id: u64, percent: u32| pb::LeaseStatus {
            lease_id: id,
            tenant: "team-a".into(),
            server_id: "gpu-a".into(),
            instance_uuid: "GPU-9".into(),
            memory_bytes: 8 << 30,
            class: pb::LeaseClass::Shared.into(),
            compute_percent: percent,
            ..Default::default()
        };
        let status = pb::PoolStatus {
            servers: vec![pb::ServerStatus {
                server_id: "gpu-a".into(),
                gpus: vec![gpu],
                gpu_leases: vec![pb::GpuLeases {
                    uuid: "GPU-9".into(),
                    exclusive: 0,
                    shared: 2,
                    shared_percent: 75,
                    busy_permille: 415,
                }],
                ..Default::default()
            }],
            leases: vec![
                lease(1, 50),
                pb::LeaseStatus { move_refused: "a session holding arrays cannot migrate".into(), ..lease(2, 25) },
            ],
            ..Default::default()
        };
        let text = render(&status, 0);
        for needle in [
            "shared: 2 leases, 75% placed, busy 41.5%",
            "shared 50%",
            "shared 25%",
            "NOT MOVED",
            "0x2    gpu-a     a session holding arrays cannot migrate",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn a_tenants_view_shows_its_leases_and_queue_only() {
        let status = pb::PoolStatus {
            tenant: "team-a".into(),
            policy: "spread".into(),
            leases: vec![pb::LeaseStatus { lease_id: 7, tenant: "team-a".into(), ..Default::default() }],
            ..Default::default()
        };
        let text = render(&status, 0);
        assert!(text.starts_with("tenant team-a · policy spread · 1 leases · 0 queued"), "{text}");
        assert!(text.contains("LEASES") && text.contains("0x7") && text.contains("QUEUE"), "{text}");
        assert!(!text.contains("SERVERS") && !text.contains("INSTANCES"), "{text}");
        assert!(!text.contains("NOT MOVED"), "no section without a refused move: {text}");
    }
}
