//! Names the library `libcuda.so.1` inside (its soname), as programs and the
//! CUDA runtime look it up by that name.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
