//! The `gpupool-balancer` binary as operators run it: `keygen` makes and
//! keeps the signing key, `new-tenant` a tenant's credential, `serve`
//! starts on the key, a secret and the tenants file and prints its address,
//! `status` prints the pool as tables (the whole pool with the servers'
//! secret, a tenant's part with its credential), and bad settings are
//! refused with every problem named.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gpupool-balancer"))
}

/// Kills the served balancer when the test ends, passed or not.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gpupool-balancer-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Starts `serve` on port 0 with `key` and `extra` flags; returns it, its
/// first line and its address.
fn serve(key: &std::path::Path, extra: &[&str], stderr: Stdio) -> (Served, String, String) {
    let mut child = exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--server-secret", "s3cret", "--recovery-ms", "0", "--key-file"])
        .arg(key)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let served = Served(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("first line");
    let addr = line.split_whitespace().nth(3).expect("address").to_string();
    (served, line, addr)
}

/// `status` of the balancer at `addr` pinned to `fingerprint`, presenting
/// `secret`.
fn status_with(addr: &str, fingerprint: &str, secret: Option<&str>) -> std::process::Output {
    let mut cmd = exe();
    cmd.args(["status", "--balancer", &format!("https://{addr}"), "--cert-sha256", fingerprint]);
    if let Some(s) = secret {
        cmd.args(["--secret", s]);
    }
    cmd.env_remove("GPUPOOL_BALANCER_SECRET").output().expect("status runs")
}

/// The certificate fingerprint in `serve`'s first line.
fn fingerprint(line: &str) -> &str {
    line.split("SHA-256 ").nth(1).and_then(|r| r.split(',').next()).expect("fingerprint")
}

#[test]
fn keygen_serve_and_status() {
    let dir = temp_dir("serve");
    let key = dir.join("lease.key");
    let out = exe().args(["keygen", "--key-file"]).arg(&key).output().expect("keygen runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(public.len(), 64, "a hex ed25519 public key: {public}");
    // The key is kept: a second keygen prints the same public key.
    let again = exe().args(["keygen", "--key-file"]).arg(&key).output().expect("keygen runs");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), public);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).expect("key file").permissions().mode();
    assert_eq!(mode & 0o077, 0, "the key file is readable by its owner only");

    // A tenant's credential: the secret for the tenant, the digest for the
    // balancer's tenants file.
    let out = exe().args(["new-tenant", "team-a", "--quota", "leases:2"]).output().expect("new-tenant runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let secret = text.lines().find(|l| l.starts_with("gpt1_")).expect("a secret").to_string();
    let entry = text.lines().find(|l| l.starts_with("team-a sha256:")).expect("a tenants-file line");
    assert!(entry.ends_with(" leases:2") && !entry.contains(&secret), "{text}");
    let tenants = dir.join("tenants");
    std::fs::write(
        &tenants,
        format!(
            "{entry}
"
        ),
    )
    .expect("tenants file");

    let (served, line, addr) = serve(&key, &["--tenants", tenants.to_str().expect("path")], Stdio::null());
    // "gpupool-balancer listening on 127.0.0.1:PORT (TLS, certificate SHA-256 …, lease public key …)"
    assert!(line.contains(&public), "{line}");
    let fingerprint = fingerprint(&line);
    assert_eq!(fingerprint.len(), 64, "{line}");

    let status_with = |secret: Option<&str>| status_with(&addr, fingerprint, secret);
    // The operator (the servers' secret) sees the whole pool.
    let status = status_with(Some("s3cret"));
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let text = String::from_utf8_lossy(&status.stdout);
    for needle in ["policy spread", "SERVERS", "INSTANCES", "LEASES", "QUEUE", "(none)"] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    // A tenant sees its own part.
    let status = status_with(Some(&secret));
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.starts_with("tenant team-a") && !text.contains("SERVERS"), "{text}");
    // No credential, or a wrong one: refused.
    for secret in [None, Some("gpt1_wrong")] {
        let status = status_with(secret);
        assert!(!status.status.success(), "answered without a credential");
        let err = String::from_utf8_lossy(&status.stderr);
        assert!(err.contains("no credential presented") || err.contains("credential not accepted"), "{err}");
    }
    // A wrong pin is refused, naming both fingerprints.
    let wrong = "ab".repeat(32);
    let status = exe()
        .args(["status", "--balancer", &format!("https://{addr}"), "--cert-sha256", &wrong])
        .output()
        .expect("status runs");
    assert!(!status.status.success());
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("does not match the pinned") && err.contains(&wrong) && err.contains(fingerprint), "{err}");
    // Plaintext is an explicit opt-in, and a TLS balancer refuses it.
    let status = exe().args(["status", "--balancer", &format!("http://{addr}")]).output().expect("status runs");
    assert!(!status.status.success());
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("no way to verify the balancer"), "{err}");
    let status =
        exe().args(["status", "--balancer", &format!("http://{addr}"), "--insecure"]).output().expect("status runs");
    assert!(!status.status.success(), "a TLS balancer answered a plaintext client");
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP reads the tenants file again: a credential added is accepted, one
/// removed is refused, and a file with a problem changes nothing.
#[test]
fn hangup_reloads_the_tenants_file() {
    use gpupool_balancer::tenants::CredentialDigest;
    let dir = temp_dir("reload");
    let tenants = dir.join("tenants");
    std::fs::write(&tenants, format!("team-a {}\n", CredentialDigest::of("gpt1_a"))).expect("tenants file");
    let (served, line, addr) = serve(&dir.join("k"), &["--tenants", tenants.to_str().expect("path")], Stdio::null());
    let pin = fingerprint(&line);
    let accepted = |secret: &str| status_with(&addr, pin, Some(secret)).status.success();
    assert!(accepted("gpt1_a") && !accepted("gpt1_b"));
    // A stream that outlives its credential's removal.
    let watching = exe()
        .args(["status", "--watch", "--balancer", &format!("https://{addr}"), "--cert-sha256", pin])
        .args(["--secret", "gpt1_a"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("status --watch starts");
    let mut watching = Served(watching);
    std::thread::sleep(Duration::from_millis(500));
    let hangup = || {
        let sent = Command::new("kill").args(["-HUP", &served.0.id().to_string()]).status().expect("kill runs");
        assert!(sent.success());
    };
    std::fs::write(&tenants, format!("team-b {}\n", CredentialDigest::of("gpt1_b"))).expect("tenants file");
    hangup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !accepted("gpt1_b") {
        assert!(std::time::Instant::now() < deadline, "the reloaded credential is not accepted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!accepted("gpt1_a"), "a removed credential is refused");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ended = loop {
        if let Some(status) = watching.0.try_wait().expect("watch process") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "a Watch outlived its credential");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!ended.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut watching.0.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(err.contains("no longer accepted"), "{err}");
    std::fs::write(&tenants, "team-c plain-secret\n").expect("tenants file");
    hangup();
    std::thread::sleep(Duration::from_millis(500));
    assert!(accepted("gpt1_b") && !accepted("plain-secret"), "a bad file changes nothing");
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Plaintext only when asked for, on both sides, with a warning.
#[test]
fn insecure_serves_plaintext_with_a_warning() {
    let dir = temp_dir("insecure");
    let log = dir.join("stderr");
    let stderr = std::fs::File::create(&log).expect("log file");
    let (served, line, addr) = serve(&dir.join("k"), &["--insecure", "--allow-anonymous-clients"], stderr.into());
    assert!(line.contains("(plaintext, lease public key"), "{line}");
    let warning = std::fs::read_to_string(&log).expect("stderr");
    assert!(warning.contains("WARN") && warning.contains("plaintext"), "{warning}");
    assert!(warning.contains("clients need no credential (--allow-anonymous-clients)"), "{warning}");
    let status =
        exe().args(["status", "--balancer", &format!("http://{addr}"), "--insecure"]).output().expect("status runs");
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    // A client that expects TLS does not fall back to plaintext.
    let status = exe()
        .args(["status", "--balancer", &format!("https://{addr}"), "--cert-sha256", &"ab".repeat(32)])
        .output()
        .expect("status runs");
    assert!(!status.status.success());
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_settings_are_all_reported() {
    let dir = temp_dir("bad");
    let out = exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--server-secret", "", "--lease-ttl-ms", "0", "--key-file"])
        .arg(dir.join("k"))
        .args(["--quota", "team=leases:x"])
        .output()
        .expect("serve runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leases:N"), "{err}");
    let out = exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--server-secret", "", "--lease-ttl-ms", "0", "--key-file"])
        .arg(dir.join("k"))
        .output()
        .expect("serve runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server secret") && err.contains("ttl"), "every problem named: {err}");
    assert!(err.contains("no client could lease: give the tenants"), "per-tenant by default: {err}");
    // The shared client secret only with its explicit opt-in.
    let out = exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--server-secret", "s", "--client-secret", "c", "--key-file"])
        .arg(dir.join("k"))
        .output()
        .expect("serve runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-shared-client-secret"), "{err}");
    // A tenants file with a plain secret in it is refused, line named.
    let tenants = dir.join("tenants");
    std::fs::write(&tenants, "team-a not-a-digest\n").expect("tenants file");
    let out = exe()
        .args(["serve", "--listen", "127.0.0.1:0", "--server-secret", "s", "--tenants"])
        .arg(&tenants)
        .arg("--key-file")
        .arg(dir.join("k"))
        .output()
        .expect("serve runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("is not a digest"), "{err}");
    let out = exe().args(["status", "--balancer", "http://127.0.0.1:9", "--insecure"]).output().expect("status runs");
    assert!(!out.status.success(), "an unreachable balancer is an error");
    std::thread::sleep(Duration::from_millis(10));
    let _ = std::fs::remove_dir_all(&dir);
}
