//! The symbol lists of the drop-in libraries, generated from the bindings
//! instead of kept by hand.
//!
//! Each drop-in library exports three sets of names: what it implements,
//! what it answers with "not supported" (its `unsupported.rs`), and, for
//! libcuda, the pre-rename legacy names. Together they must cover every
//! function of the API version the bindings describe (cudarc's `sys` for
//! the CUDA 13.0 driver API, nvml-wrapper-sys for NVML), and no name may be
//! in two sets. The tests of each library check that with [`check`]; with
//! `GPUPOOL_WRITE_SYMBOLS=1` they rewrite the library's `unsupported.rs` list
//! from the bindings minus the other sets instead ([`regenerate`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the registry sources of `package` (at the version the workspace's
/// `Cargo.lock` pins) are unpacked.
pub fn registry_source(workspace: &Path, package: &str) -> Result<PathBuf, String> {
    let lock = std::fs::read_to_string(workspace.join("Cargo.lock")).map_err(|e| format!("Cargo.lock: {e}"))?;
    let header = format!("name = \"{package}\"\nversion = \"");
    let at = lock.find(&header).ok_or_else(|| format!("{package} is not in Cargo.lock"))? + header.len();
    let version = &lock[at..at + lock[at..].find('"').ok_or("malformed Cargo.lock")?];
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registries = home.join("registry/src");
    let dirs = std::fs::read_dir(&registries).map_err(|e| format!("{}: {e}", registries.display()))?;
    dirs.filter_map(Result::ok).map(|d| d.path().join(format!("{package}-{version}"))).find(|p| p.is_dir()).ok_or_else(
        || format!("{package}-{version} is not unpacked under {} (vendored sources?)", registries.display()),
    )
}

/// The functions `pub unsafe fn <prefix>…(` of a bindings file, leaving out
/// those behind a `#[cfg(...)]` that does not name `feature` (when given).
pub fn binding_functions(source: &str, prefix: &str, feature: Option<&str>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut previous = "";
    for line in source.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("pub unsafe fn ").filter(|r| r.starts_with(prefix)) {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let gated = previous.starts_with("#[cfg(");
            let enabled = match feature {
                Some(f) if gated => previous.contains(&format!("\"{f}\"")) && !previous.starts_with("#[cfg(not"),
                _ => true,
            };
            if enabled {
                out.insert(name);
            }
        }
        if !trimmed.is_empty() {
            previous = trimmed;
        }
    }
    out
}

/// What is wrong with the three sets, one line per problem (empty: nothing).
pub fn check(
    api: &BTreeSet<String>,
    implemented: &BTreeSet<String>,
    unsupported: &BTreeSet<String>,
    legacy: &BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for n in implemented.intersection(unsupported) {
        problems.push(format!("{n} is implemented and also listed as unsupported"));
    }
    for n in api {
        if !implemented.contains(n) && !unsupported.contains(n) && !legacy.contains(n) {
            problems.push(format!("{n} is in the API but not exported"));
        }
    }
    for n in unsupported {
        if !api.contains(n) {
            problems.push(format!("{n} is listed as unsupported but is not in the API"));
        }
    }
    problems
}

/// Rewrites the name list of an `unsupported.rs` (the lines between the
/// `<marker> {` line and its closing `}`) to `names`, keeping everything
/// else of the file.
pub fn regenerate(file: &Path, marker: &str, names: &BTreeSet<String>) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let open = format!("{marker} {{\n");
    let start = text.find(&open).ok_or_else(|| format!("no `{marker} {{` line in {}", file.display()))? + open.len();
    let end = start + text[start..].find("\n}\n").ok_or("no closing brace")?;
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..start]);
    let list: Vec<String> = names.iter().map(|n| format!("    {n}")).collect();
    out.push_str(&list.join("\n"));
    out.push_str(&text[end..]);
    std::fs::write(file, out).map_err(|e| format!("{}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn functions_follow_their_feature_gate() {
        let src = "pub unsafe fn cuA(x: u32) -> CUresult {\n}\n\
            #[cfg(any(feature = \"cuda-12050\", feature = \"cuda-13000\"))]\npub unsafe fn cuB() {}\n\
            #[cfg(any(feature = \"cuda-11080\"))]\npub unsafe fn cuC() {}\n\
            #[cfg(not(feature = \"cuda-13000\"))]\npub unsafe fn cuD() {}\n\
            pub unsafe fn other() {}\n";
        assert_eq!(binding_functions(src, "cu", Some("cuda-13000")), set(&["cuA", "cuB"]));
        assert_eq!(binding_functions(src, "cu", None), set(&["cuA", "cuB", "cuC", "cuD"]));
    }

    #[test]
    fn check_reports_each_kind_of_gap() {
        let api = set(&["a", "b", "c", "d"]);
        let problems = check(&api, &set(&["a", "b"]), &set(&["b", "c", "x"]), &set(&[]));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("b is implemented and also"));
        assert!(problems[1].contains("d is in the API"));
        assert!(problems[2].contains("x is listed"));
        assert!(check(&api, &set(&["a", "b"]), &set(&["c"]), &set(&["d"])).is_empty());
    }

    #[test]
    fn regenerate_keeps_the_frame() {
        let dir = std::env::temp_dir().join(format!("gpupool-symbols-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("unsupported.rs");
        std::fs::write(&file, "//! doc\nlist! {\n    old\n}\n\n#[cfg(test)]\nmod t {}\n").unwrap();
        regenerate(&file, "list!", &set(&["b", "a"])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "//! doc\nlist! {\n    a\n    b\n}\n\n#[cfg(test)]\nmod t {}\n"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
