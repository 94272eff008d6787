//! The Terraform under `infra/` against the server's MIG tables, offline:
//! - `infra/modules/gpu-fleet/mig-profiles.json`, which Terraform validates
//!   layouts with, holds exactly the profile tables of `GpuModel::ALL`;
//! - every layout the example root and the README name fits its instance
//!   type's GPU, by `Layout::plan`;
//! - the boot script that creates the instances (`files/gpupool-mig.sh plan`)
//!   places every layout `Layout::plan` can place, at placements NVML allows,
//!   and refuses the others;
//! - Terraform's own check (names exist, slices add up) accepts exactly the
//!   layouts that fit;
//! - `gpupool-mig.sh apply`, against a fake `nvidia-smi`, enables MIG mode,
//!   reboots once where the change stays pending, clears old instances and
//!   creates the planned ones at every boot.

use gpupool_server::mig::{GpuModel, Layout, Placement};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn infra() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra")
}

fn read_json(rel: &str) -> Value {
    let path = infra().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn profile_table() -> Value {
    read_json("modules/gpu-fleet/mig-profiles.json")
}

fn u32_of(v: &Value, what: &str) -> u32 {
    v.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or_else(|| panic!("{what}: not a small integer: {v}"))
}

/// The GPU model of an instance type, from the JSON table.
fn model_of(table: &Value, instance_type: &str) -> GpuModel {
    let key = table["instance_types"][instance_type]
        .as_str()
        .unwrap_or_else(|| panic!("instance type {instance_type} is not in mig-profiles.json"));
    GpuModel::lookup(key).unwrap_or_else(|| panic!("{instance_type}: unknown model key {key}"))
}

#[test]
fn profile_table_matches_the_server() {
    let table = profile_table();
    let models = table["models"].as_object().expect("models");
    let want: Vec<&str> = GpuModel::ALL.iter().map(|m| m.key()).collect();
    let mut got: Vec<&str> = models.keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want_sorted = want.clone();
    want_sorted.sort_unstable();
    assert_eq!(got, want_sorted, "models in mig-profiles.json");
    for model in GpuModel::ALL {
        let profiles = models[model.key()]["profiles"].as_object().expect("profiles");
        let mut names: Vec<&str> = profiles.keys().map(String::as_str).collect();
        names.sort_unstable();
        let mut want_names: Vec<&str> = model.profiles().iter().map(|p| p.name).collect();
        want_names.sort_unstable();
        assert_eq!(names, want_names, "{model}: profile names");
        for p in model.profiles() {
            let row = &profiles[p.name];
            let what = format!("{model} {}", p.name);
            assert_eq!(u32_of(&row["id"], &what), p.id, "{what}: id");
            assert_eq!(u32_of(&row["memory_slices"], &what), p.memory_slices, "{what}: memory slices");
            assert_eq!(u32_of(&row["compute_slices"], &what), p.compute_slices, "{what}: compute slices");
            let starts: Vec<u32> = row["starts"].as_array().expect("starts").iter().map(|s| u32_of(s, &what)).collect();
            assert_eq!(starts, p.starts, "{what}: starts");
            assert_eq!(row.as_object().map(|o| o.len()), Some(4), "{what}: unexpected fields");
        }
    }
}

#[test]
fn instance_types_map_to_their_gpus() {
    let table = profile_table();
    let got: BTreeMap<&str, &str> = table["instance_types"]
        .as_object()
        .expect("instance_types")
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str().expect("model key")))
        .collect();
    let want = BTreeMap::from([
        ("p4d.24xlarge", "a100-40gb"),
        ("p4de.24xlarge", "a100-80gb"),
        ("p5.48xlarge", "h100-80gb"),
        ("p5e.48xlarge", "h200-141gb"),
        ("p5en.48xlarge", "h200-141gb"),
    ]);
    assert_eq!(got, want);
}

/// `instance_type` and `mig_layout` of the example root's `terraform.tfvars.example`
/// (one assignment per line, as the file writes them).
fn example_tfvars() -> (String, Vec<String>) {
    let path = infra().join("examples/pool/terraform.tfvars.example");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let value = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(name))
            .find_map(|rest| rest.trim_start().strip_prefix('='))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: no `{name} = ...` line", path.display()))
    };
    let quoted = |s: &str| s.trim().trim_matches('"').to_owned();
    let instance_type = quoted(value("instance_type"));
    let list = value("mig_layout");
    let inner = list
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or_else(|| panic!("mig_layout is not a one-line list: {list}"));
    let layout = inner.split(',').map(quoted).filter(|s| !s.is_empty()).collect();
    (instance_type, layout)
}

/// Every (instance type, layout) the example root and README name.
fn named_layouts() -> Vec<(String, Vec<String>)> {
    let mut all = vec![example_tfvars()];
    let examples = read_json("modules/gpu-fleet/example-layouts.json");
    for (instance_type, layouts) in examples["layouts"].as_object().expect("layouts") {
        for layout in layouts.as_array().expect("list of layouts") {
            let names = layout.as_array().expect("layout").iter().map(|n| n.as_str().expect("name").to_owned());
            all.push((instance_type.clone(), names.collect()));
        }
    }
    all
}

#[test]
fn named_layouts_fit_their_instance_types() {
    let table = profile_table();
    let named = named_layouts();
    assert!(named.len() > 20, "expected the example layouts, got {}", named.len());
    for (instance_type, layout) in &named {
        let model = model_of(&table, instance_type);
        if let Err(e) = Layout::plan(model, layout) {
            panic!("{instance_type} ({model}): {e}");
        }
        assert!(terraform_accepts(model, layout), "{instance_type}: Terraform's check refuses {layout:?}");
    }
    // The README's pick per instance type covers every type in the table.
    let examples = read_json("modules/gpu-fleet/example-layouts.json");
    let table_types: Vec<&String> = table["instance_types"].as_object().expect("types").keys().collect();
    let example_types: Vec<&String> = examples["layouts"].as_object().expect("layouts").keys().collect();
    assert_eq!(example_types, table_types);
}

/// What `infra/modules/gpu-fleet` checks in Terraform: every name is a profile of the
/// model, memory slices add up to at most 8 and compute slices to at most 7.
fn terraform_accepts(model: GpuModel, layout: &[impl AsRef<str>]) -> bool {
    let mut memory = 0;
    let mut compute = 0;
    for name in layout {
        let Some(p) = model.profiles().iter().find(|p| p.name == name.as_ref()) else {
            return false;
        };
        memory += p.memory_slices;
        compute += p.compute_slices;
    }
    !layout.is_empty() && memory <= 8 && compute <= 7
}

/// Every multiset of the model's profiles with 1 to 8 members.
fn all_layouts(model: GpuModel) -> Vec<Vec<&'static str>> {
    fn grow(names: &[&'static str], from: usize, cur: &mut Vec<&'static str>, out: &mut Vec<Vec<&'static str>>) {
        if !cur.is_empty() {
            out.push(cur.clone());
        }
        if cur.len() == 8 {
            return;
        }
        for i in from..names.len() {
            cur.push(names[i]);
            grow(names, i, cur, out);
            cur.pop();
        }
    }
    let names: Vec<&'static str> = model.profiles().iter().map(|p| p.name).collect();
    let mut out = Vec::new();
    grow(&names, 0, &mut Vec::new(), &mut out);
    out
}

/// Terraform checks sums, not placements; for these tables the sums are exact: a
/// layout fits if and only if its memory slices add up to at most 8 and its compute
/// slices to at most 7. Should a table change break that, this says which layout.
#[test]
fn terraform_check_accepts_exactly_what_fits() {
    for model in GpuModel::ALL {
        let layouts = all_layouts(model);
        assert_eq!(layouts.len(), 3002, "{model}");
        for layout in &layouts {
            let fits = Layout::plan(model, layout).is_ok();
            assert_eq!(terraform_accepts(model, layout), fits, "{model} {layout:?}: fits = {fits}");
        }
        // The names are checked per model: another model's spelling is refused.
        let other = if model == GpuModel::H200_141GB { "1g.10gb" } else { "1g.18gb" };
        assert!(!terraform_accepts(model, &[other]), "{model} accepts {other}");
    }
}

/// Runs `gpupool-mig.sh plan` for `model` over `layouts`; one answer line per layout.
fn script_plans(model: GpuModel, layouts: &[Vec<&str>]) -> Vec<String> {
    let script = infra().join("modules/gpu-fleet/files/gpupool-mig.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("plan")
        .env("GPUPOOL_MIG_PROFILES", profiles_env(model))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run bash");
    let input: String = layouts.iter().map(|l| format!("{}\n", l.join(","))).collect();
    // Written from a thread: the answers come back while the layouts are still going in.
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("gpupool-mig.sh plan");
    writer.join().expect("writer thread").expect("write layouts");
    assert!(out.status.success(), "{} plan failed: {:?}", script.display(), out.status);
    let lines: Vec<String> = String::from_utf8(out.stdout).expect("utf-8").lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), layouts.len(), "one answer per layout");
    lines
}

/// Checks the script's answers against `Layout::plan`; returns how many layouts fit.
fn check_script_answers(model: GpuModel, layouts: &[Vec<&str>]) -> usize {
    let answers = script_plans(model, layouts);
    let mut fits = 0;
    for (layout, answer) in layouts.iter().zip(&answers) {
        match (Layout::plan(model, layout), answer.strip_prefix("ok ")) {
            (Ok(_), Some(plan)) => {
                fits += 1;
                let placed: Vec<(u32, Placement)> = plan
                    .split(',')
                    .map(|pair| {
                        let (id, start) = pair.split_once(':').expect("ID:START");
                        let id: u32 = id.parse().expect("id");
                        let size = model.profile_by_id(id).expect("known id").memory_slices;
                        (id, Placement::new(start.parse().expect("start"), size))
                    })
                    .collect();
                assert_eq!(placed.len(), layout.len(), "{model} {layout:?}: {answer}");
                for (i, (name, (id, at))) in layout.iter().zip(&placed).enumerate() {
                    let p = model.profile_by_name(name).expect("profile");
                    assert_eq!(p.id, *id, "{model} {layout:?}: {answer}");
                    assert!(p.allows(*at), "{model} {layout:?}: {name} at {at} ({answer})");
                    for (_, other) in &placed[i + 1..] {
                        assert!(!at.overlaps(*other), "{model} {layout:?}: {at} overlaps {other}");
                    }
                }
            }
            (Err(_), Some(_)) => panic!("{model} {layout:?}: the script placed what does not fit: {answer}"),
            (Ok(_), None) => panic!("{model} {layout:?}: fits, but the script says {answer}"),
            (Err(_), None) => assert!(answer.starts_with("error "), "{answer}"),
        }
    }
    fits
}

#[test]
fn boot_script_places_what_the_planner_places() {
    // Every layout on one model: the script sees only ids, sizes and starts, which
    // every model shares (profile_table_matches_the_server), so one model covers the
    // search; the named layouts run on each model in its own names.
    let fits = check_script_answers(GpuModel::H100_80GB, &all_layouts(GpuModel::H100_80GB));
    assert_eq!(fits, 77, "layouts of 1 to 8 H100 instances that fit");
    let table = profile_table();
    let named = named_layouts();
    for model in GpuModel::ALL {
        let mine: Vec<Vec<&str>> = named
            .iter()
            .filter(|(instance_type, _)| model_of(&table, instance_type) == model)
            .map(|(_, layout)| layout.iter().map(String::as_str).collect())
            .collect();
        assert!(!mine.is_empty(), "{model}: no named layouts");
        assert_eq!(check_script_answers(model, &mine), mine.len(), "{model}: a named layout does not fit");
    }
    // Unknown names are refused with the model's names listed.
    let answers = script_plans(GpuModel::H100_80GB, &[vec!["1g.18gb"], vec![]]);
    assert!(answers[0].starts_with("error no MIG profile '1g.18gb'") && answers[0].contains("1g.10gb"), "{answers:?}");
    assert_eq!(answers[1], "error empty layout");
}

/// A host for `gpupool-mig.sh apply`: fake `nvidia-smi`, `systemctl` and
/// `sleep` on PATH that keep the GPUs' MIG state in files and log every
/// command that would change something.
struct FakeHost {
    dir: PathBuf,
}

/// The fake `nvidia-smi`. State: `$FAKE/mig.<gpu>` (Enabled or Disabled),
/// `$FAKE/instances.<gpu>`; `FAKE_MIG_ENABLE=pending` leaves a MIG mode
/// change pending (as on NVSwitch hosts) until `$FAKE/rebooted` exists.
const FAKE_NVIDIA_SMI: &str = r#"#!/usr/bin/env bash
set -euo pipefail
log() { echo "$*" >>"$FAKE/log"; }
gpu=
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do [[ ${args[i]} == -i ]] && gpu=${args[i + 1]}; done
case "$*" in
    "--query-gpu=index --format=csv,noheader,nounits") seq 0 $((FAKE_GPUS - 1)) ;;
    *"--query-gpu=mig.mode.current"*) cat "$FAKE/mig.$gpu" 2>/dev/null || echo Disabled ;;
    "-pm 1") log "persistence on" ;;
    *"-mig 1")
        log "gpu $gpu: enable MIG"
        if [[ ${FAKE_MIG_ENABLE:-now} == pending && ! -e $FAKE/rebooted ]]; then
            echo "Warning: MIG mode is in pending enable state for GPU $gpu" >&2
        else
            echo Enabled >"$FAKE/mig.$gpu"
        fi ;;
    "mig -i $gpu -dci")
        [[ -s $FAKE/instances.$gpu ]] || exit 6
        log "gpu $gpu: destroy compute instances" ;;
    "mig -i $gpu -dgi")
        [[ -s $FAKE/instances.$gpu ]] || exit 6
        log "gpu $gpu: destroy GPU instances"
        : >"$FAKE/instances.$gpu" ;;
    "mig -i $gpu -cgi "*" -C")
        [[ $(cat "$FAKE/mig.$gpu" 2>/dev/null) == Enabled ]] || { echo "MIG mode is disabled" >&2; exit 3; }
        [[ ! -s $FAKE/instances.$gpu ]] || { echo "instances left over" >&2; exit 3; }
        log "gpu $gpu: create $5"
        echo "$5" >"$FAKE/instances.$gpu" ;;
    "-L") log "list" ;;
    *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"#;

impl FakeHost {
    fn new(name: &str, gpus: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("gpupool-mig-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).expect("fake host dir");
        let tools = [
            ("nvidia-smi", FAKE_NVIDIA_SMI),
            ("systemctl", "#!/bin/sh\necho \"systemctl $*\" >>\"$FAKE/log\"\n"),
            ("sleep", "#!/bin/sh\necho \"sleep $*\" >>\"$FAKE/log\"\n"),
        ];
        for (tool, text) in tools {
            let path = dir.join("bin").join(tool);
            std::fs::write(&path, text).expect("write fake tool");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        }
        std::fs::write(dir.join("gpus"), gpus.to_string()).expect("gpu count");
        Self { dir }
    }

    fn set_mig(&self, gpu: u32, mode: &str) {
        std::fs::write(self.dir.join(format!("mig.{gpu}")), format!("{mode}\n")).expect("mig state");
    }

    /// The GPU instances `gpu` holds ("" for none).
    fn set_instances(&self, gpu: u32, plan: &str) {
        std::fs::write(self.dir.join(format!("instances.{gpu}")), plan).expect("instances");
    }

    fn reboot(&self) {
        std::fs::write(self.dir.join("rebooted"), "").expect("reboot flag");
    }

    /// Runs `gpupool-mig.sh apply` (as the boot unit does); returns success,
    /// the log of what it did (cleared), and stderr.
    fn apply(&self, model: GpuModel, layout: &str, enable: &str) -> (bool, Vec<String>, String) {
        let gpus = std::fs::read_to_string(self.dir.join("gpus")).expect("gpu count");
        let path = format!("{}:{}", self.dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("bash")
            .arg(infra().join("modules/gpu-fleet/files/gpupool-mig.sh"))
            .arg("apply")
            .env("PATH", path)
            .env("FAKE", &self.dir)
            .env("FAKE_GPUS", gpus.trim())
            .env("FAKE_MIG_ENABLE", enable)
            .env("GPUPOOL_MIG_PROFILES", profiles_env(model))
            .env("GPUPOOL_MIG_LAYOUT", layout)
            .env("GPUPOOL_MIG_STATE_DIR", self.dir.join("state"))
            .output()
            .expect("run gpupool-mig.sh apply");
        let log_path = self.dir.join("log");
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        (out.status.success(), log.lines().map(str::to_owned).collect(), String::from_utf8_lossy(&out.stderr).into())
    }

    fn marker(&self) -> bool {
        self.dir.join("state/mig-reboot-done").exists()
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GPUPOOL_MIG_PROFILES` for `model`, as Terraform writes it.
fn profiles_env(model: GpuModel) -> String {
    model
        .profiles()
        .iter()
        .map(|p| {
            let starts: Vec<String> = p.starts.iter().map(u32::to_string).collect();
            format!("{}:{}:{}:{}", p.name, p.id, p.memory_slices, starts.join("/"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn boot_script_applies_the_layout_at_every_boot() {
    let model = GpuModel::H100_80GB;
    let layout = "3g.40gb,2g.20gb,1g.10gb,1g.10gb";
    let plan = script_plans(model, &[layout.split(',').collect()]).remove(0);
    let plan = plan.strip_prefix("ok ").expect("the layout fits").to_owned();
    let create = |gpu: u32| format!("gpu {gpu}: create {plan}");

    // First boot, MIG off on both GPUs and the driver switches at once: MIG on,
    // nothing to destroy, the planned instances on each GPU.
    let host = FakeHost::new("first-boot", 2);
    let (ok, log, err) = host.apply(model, layout, "now");
    assert!(ok, "{err}");
    assert_eq!(
        log,
        ["persistence on", "gpu 0: enable MIG", "gpu 1: enable MIG", &create(0), &create(1), "list"],
        "{err}"
    );

    // A later boot: MIG mode survived, the instances did not; MIG is left alone.
    host.set_instances(0, "");
    host.set_instances(1, "");
    let (ok, log, err) = host.apply(model, layout, "now");
    assert!(ok, "{err}");
    assert_eq!(log, ["persistence on", &create(0), &create(1), "list"]);

    // The unit run again without a reboot, over instances of an older layout:
    // they are destroyed first (compute, then GPU instances).
    host.set_instances(1, "19:6");
    let (ok, log, err) = host.apply(model, layout, "now");
    assert!(ok, "{err}");
    let mut want = vec!["persistence on".to_owned()];
    for gpu in 0..2 {
        want.push(format!("gpu {gpu}: destroy compute instances"));
        want.push(format!("gpu {gpu}: destroy GPU instances"));
        want.push(create(gpu));
    }
    want.push("list".to_owned());
    assert_eq!(log, want);

    // An NVSwitch host: the mode change waits for a reset, so the unit reboots
    // once (and holds gpupool-server back meanwhile); after the reboot MIG is
    // on and the instances are created.
    let host = FakeHost::new("pending", 1);
    let (ok, log, err) = host.apply(model, layout, "pending");
    assert!(ok, "{err}");
    assert_eq!(log, ["persistence on", "gpu 0: enable MIG", "systemctl --no-block reboot", "sleep 600"]);
    assert!(host.marker(), "no reboot marker");
    host.reboot();
    let (ok, log, err) = host.apply(model, layout, "pending");
    assert!(ok, "{err}");
    assert_eq!(log, ["persistence on", "gpu 0: enable MIG", &create(0), "list"]);
    assert!(!host.marker(), "the reboot marker outlived a successful boot");

    // Still pending after the one reboot: the unit fails instead of rebooting
    // in a loop, and says why.
    let host = FakeHost::new("stuck", 1);
    let (ok, _, _) = host.apply(model, layout, "pending");
    assert!(ok);
    let (ok, log, err) = host.apply(model, layout, "pending");
    assert!(!ok, "a second reboot was attempted: {log:?}");
    assert!(!log.iter().any(|l| l.contains("reboot")), "{log:?}");
    assert!(err.contains("MIG mode still not enabled on GPU(s) 0 after a reboot"), "{err}");

    // A layout that does not fit is refused before any GPU is touched.
    let host = FakeHost::new("bad-layout", 1);
    host.set_mig(0, "Enabled");
    let (ok, log, err) = host.apply(model, "4g.40gb,4g.40gb", "now");
    assert!(!ok);
    assert!(log.is_empty(), "{log:?}");
    assert!(err.contains("does not fit") || err.contains("memory slices"), "{err}");
}

/// The H200 table (and through `profile_table_matches_the_server`, the
/// Terraform one) against `nvidia-smi mig -lgip` / `-lgipp` of a real H200.
#[test]
fn h200_table_matches_the_cards_listing() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/nvidia-smi/h200-driver-580.159.04.txt");
    let listing = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // "|   0  MIG 1g.18gb         19     7/7        16.00      No     16     1     0   |"
    let mut listed = BTreeMap::new();
    for line in listing.lines().filter(|l| l.starts_with('|') && l.contains(" MIG ")) {
        let cells: Vec<&str> = line.trim_matches(|c| c == '|' || c == ' ').split_whitespace().collect();
        let (name, id, gib, sms) = (cells[2], cells[3], cells[5], cells[7]);
        let id: u32 = id.parse().expect("profile id");
        listed.insert(id, (name.to_owned(), gib.parse::<f64>().expect("GiB"), sms.parse::<u32>().expect("SMs")));
    }
    // "GPU  0 Profile ID 15 Placements: {0,2,4,6}:2"
    let mut placements = BTreeMap::new();
    for line in listing.lines().filter(|l| l.contains("Profile ID")) {
        let (head, tail) = line.split_once(':').expect("placements");
        let id: u32 = head.split_whitespace().nth(4).expect("id").parse().expect("id");
        let (starts, size) = tail.trim().trim_start_matches('{').split_once("}:").expect("{starts}:size");
        let starts: Vec<u32> = starts.split(',').map(|s| s.parse().expect("start")).collect();
        placements.insert(id, (starts, size.parse::<u32>().expect("size")));
    }
    let model = GpuModel::H200_141GB;
    for p in model.profiles() {
        let (name, gib, sms) = listed.get(&p.id).unwrap_or_else(|| panic!("{}: id {} not on the card", p.name, p.id));
        assert_eq!(format!("MIG {}", p.name), format!("MIG {name}"), "id {}", p.id);
        assert_eq!(p.sms, *sms, "{}: SMs", p.name);
        let table_gib = p.memory_bytes as f64 / (1u64 << 30) as f64;
        assert!((table_gib - gib).abs() < 0.006, "{}: {table_gib:.3} GiB in the table, {gib} on the card", p.name);
        let (starts, size) = &placements[&p.id];
        assert_eq!(p.starts, starts.as_slice(), "{}: starts", p.name);
        assert_eq!(p.memory_slices, *size, "{}: memory slices", p.name);
    }
    // What the card has beyond the table: only the `+me` (media engine) variant.
    let extra: Vec<&String> =
        listed.iter().filter(|(id, _)| model.profile_by_id(**id).is_none()).map(|(_, (n, _, _))| n).collect();
    assert_eq!(extra, ["1g.18gb+me"]);
}
