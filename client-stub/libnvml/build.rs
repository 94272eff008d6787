//! Names the library `libnvidia-ml.so.1` inside (its soname): NVML users
//! (pynvml, PyTorch, NCCL, monitoring tools) dlopen it by that name, and a
//! program linked against it records that name as its dependency.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvidia-ml.so.1");
}
