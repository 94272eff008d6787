//! The built-in module: kernels every server can run without an upload,
//! addressed by name from the image [`gpupool_proto::BUILTIN_MODULE`].
//! CUDA servers compile [`SOURCE`] with NVRTC; the emulated device runs the
//! reference implementations in [`run`] with the same parameter layouts and
//! the same thread-to-element mapping.

use super::{DeviceResult, FunctionInfo, LaunchDims, Param};
use crate::error::CallError;
use gpupool_proto::cuda;

/// CUDA C source of the built-in kernels.
pub const SOURCE: &str = gpupool_proto::BUILTIN_SOURCE;

/// `true` when `image` names the built-in module, also as a C string: the
/// drop-in libcuda sends text images with their terminating NUL, as CUDA
/// reads PTX, so `cuModuleLoadData("gpupool-builtin-kernels/v1\n")` reaches
/// the built-in kernels from unmodified CUDA code too.
pub fn is_builtin(image: &[u8]) -> bool {
    let name = gpupool_proto::BUILTIN_MODULE;
    image == name || image.strip_suffix(&[0]) == Some(name)
}

const PTR: u32 = 8;
const U32: u32 = 4;
const U64: u32 = 8;

/// Names and parameter sizes, in the order of [`functions`].
const KERNELS: &[(&str, &[u32])] = &[
    ("empty", &[]),
    ("vector_add", &[PTR, PTR, PTR, U32]),
    ("saxpy", &[U32, PTR, PTR, U32]),
    ("matmul_f32", &[PTR, PTR, PTR, U32, U32, U32]),
    ("print_ids", &[U32]),
    ("tally_add", &[U64]),
    ("check_below", &[U32]),
];

/// The module's variables: names and sizes. The emulated device places
/// them outside every session's range, where it chooses, and passes their
/// addresses to [`run`] in this order.
pub const VARIABLES: &[(&str, u64)] = &[("tally", 8)];

/// The built-in functions with their parameter layouts (natural alignment,
/// as nvcc lays out kernel parameters).
pub fn functions() -> Vec<FunctionInfo> {
    KERNELS
        .iter()
        .map(|(name, sizes)| {
            let mut offset = 0u32;
            let params = sizes
                .iter()
                .map(|&size| {
                    offset = offset.div_ceil(size) * size;
                    let p = Param { offset, size };
                    offset += size;
                    p
                })
                .collect();
            FunctionInfo {
                name: (*name).to_string(),
                params,
                max_threads_per_block: 1024,
                // Backends fill these in: they depend on the device.
                attributes: Default::default(),
                described: true,
            }
        })
        .collect()
}

/// Device memory as the reference kernels see it.
pub trait Memory {
    fn load(&self, addr: u64, out: &mut [u8]) -> DeviceResult<()>;
    fn store(&mut self, addr: u64, data: &[u8]) -> DeviceResult<()>;
}

/// Largest operand a reference kernel reads or writes. The emulated device
/// serves tests and demos; sizes from the wire are checked against this
/// before anything is allocated, so a launch naming 2^32 elements is an
/// error reply, not an allocation that aborts the process.
pub const MAX_OPERAND_BYTES: u64 = 1 << 30;

/// Most multiply-adds one reference `matmul_f32` does (a few seconds on
/// one core); more is refused rather than left to hold the session.
pub const MAX_MATMUL_WORK: u64 = 1 << 32;

fn too_big(what: &str) -> CallError {
    CallError::invalid_value(format!(
        "{what} exceeds what the emulated device's reference kernels handle ({MAX_OPERAND_BYTES} bytes an operand, {MAX_MATMUL_WORK} multiply-adds)"
    ))
}

/// Elements of `n` f32s as bytes, checked against [`MAX_OPERAND_BYTES`].
fn operand_len(n: u64, what: &str) -> DeviceResult<usize> {
    n.checked_mul(4).filter(|&b| b <= MAX_OPERAND_BYTES).map(|b| b as usize / 4).ok_or_else(|| too_big(what))
}

fn load_f32s(mem: &dyn Memory, addr: u64, n: usize) -> DeviceResult<Vec<f32>> {
    let n = operand_len(n as u64, "an operand")?;
    let mut bytes = vec![0u8; n * 4];
    mem.load(addr, &mut bytes)?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn store_f32s(mem: &mut dyn Memory, addr: u64, v: &[f32]) -> DeviceResult<()> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    mem.store(addr, &bytes)
}

struct Args<'a> {
    params: &'a [u8],
    layout: &'a [Param],
}

impl Args<'_> {
    fn raw(&self, i: usize) -> &[u8] {
        let p = self.layout[i];
        &self.params[p.offset as usize..(p.offset + p.size) as usize]
    }
    fn u64(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.raw(i));
        u64::from_le_bytes(b)
    }
    fn u32(&self, i: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.raw(i));
        u32::from_le_bytes(b)
    }
    fn f32(&self, i: usize) -> f32 {
        f32::from_bits(self.u32(i))
    }
}

fn threads(dims: &LaunchDims, axis: usize) -> u64 {
    u64::from(dims.grid[axis]) * u64::from(dims.block[axis])
}

/// What the reference kernels write for the program: device printf output
/// (stdout) and failed asserts' messages (stderr). Like the driver's printf
/// FIFO (`CU_LIMIT_PRINTF_FIFO_SIZE`) it holds output until the next
/// synchronization; unlike the driver's circular buffer, which may keep
/// later lines, each stream keeps the first `capacity` bytes of whole lines
/// and loses the rest. An assert's launch fails with `CUDA_ERROR_ASSERT`.
#[derive(Debug, Default)]
pub struct DeviceOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub capacity: usize,
}

impl DeviceOutput {
    /// Appends one printf line if it fits; `false` once the buffer is full.
    fn print(&mut self, line: &str) -> bool {
        Self::push(&mut self.stdout, self.capacity, line)
    }

    /// Appends one assert message if it fits; `false` once full.
    fn assert_failed(&mut self, line: &str) -> bool {
        Self::push(&mut self.stderr, self.capacity, line)
    }

    fn push(to: &mut Vec<u8>, capacity: usize, line: &str) -> bool {
        if to.len() + line.len() > capacity {
            return false;
        }
        to.extend_from_slice(line.as_bytes());
        true
    }
}

/// [`functions`], made once: every launch on the emulated device looks
/// its kernel up here.
fn layout() -> &'static [FunctionInfo] {
    static LAYOUT: std::sync::OnceLock<Vec<FunctionInfo>> = std::sync::OnceLock::new();
    LAYOUT.get_or_init(functions)
}

/// Runs built-in function `index` on `mem`, with the module's variables at
/// `variables` (in [`VARIABLES`] order). The parameter buffer has been
/// checked against the layout by the caller.
pub fn run(
    index: usize,
    dims: LaunchDims,
    params: &[u8],
    mem: &mut dyn Memory,
    output: &mut DeviceOutput,
    variables: &[u64],
) -> DeviceResult<()> {
    let f = layout()
        .get(index)
        .ok_or_else(|| CallError::invalid_handle(format!("built-in function {index} does not exist")))?;
    if params.len() < f.params_size() as usize {
        return Err(CallError::invalid_value("parameter buffer shorter than the layout"));
    }
    let args = Args { params, layout: &f.params };
    match f.name.as_str() {
        "empty" => Ok(()),
        "vector_add" => {
            let n = (args.u32(3) as u64).min(threads(&dims, 0)) as usize;
            let a = load_f32s(mem, args.u64(0), n)?;
            let b = load_f32s(mem, args.u64(1), n)?;
            let c: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            store_f32s(mem, args.u64(2), &c)
        }
        "saxpy" => {
            let n = (args.u32(3) as u64).min(threads(&dims, 0)) as usize;
            let alpha = args.f32(0);
            let x = load_f32s(mem, args.u64(1), n)?;
            let mut y = load_f32s(mem, args.u64(2), n)?;
            for (yi, xi) in y.iter_mut().zip(&x) {
                *yi += alpha * xi;
            }
            store_f32s(mem, args.u64(2), &y)
        }
        "matmul_f32" => {
            let (m, n, k) = (u64::from(args.u32(3)), u64::from(args.u32(4)), u64::from(args.u32(5)));
            let rows = m.min(threads(&dims, 1));
            let cols = n.min(threads(&dims, 0));
            let elements = |x: u64, y: u64| x.checked_mul(y).ok_or_else(|| too_big("a matrix"));
            let (a_len, b_len, c_len) = (elements(m, k)?, elements(k, n)?, elements(m, n)?);
            if rows.checked_mul(cols).and_then(|rc| rc.checked_mul(k)).is_none_or(|w| w > MAX_MATMUL_WORK) {
                return Err(too_big("the product"));
            }
            let (n, k) = (n as usize, k as usize);
            let (rows, cols) = (rows as usize, cols as usize);
            let a = load_f32s(mem, args.u64(0), operand_len(a_len, "matrix A")?)?;
            let b = load_f32s(mem, args.u64(1), operand_len(b_len, "matrix B")?)?;
            // Rows and columns outside the launched grid stay as they were.
            let mut c = load_f32s(mem, args.u64(2), operand_len(c_len, "matrix C")?)?;
            for r in 0..rows {
                for col in 0..cols {
                    let mut acc = 0.0f32;
                    for i in 0..k {
                        acc += a[r * k + i] * b[i * n + col];
                    }
                    c[r * n + col] = acc;
                }
            }
            store_f32s(mem, args.u64(2), &c)
        }
        "print_ids" => {
            // Block by block, thread by thread (x only, as the kernel
            // prints); a GPU interleaves blocks in no fixed order.
            let tag = args.u32(0);
            let per_block = u64::from(dims.block[0]) * u64::from(dims.block[1]) * u64::from(dims.block[2]);
            'blocks: for block in 0..u64::from(dims.grid[0]) * u64::from(dims.grid[1]) * u64::from(dims.grid[2]) {
                for thread in 0..per_block {
                    let (b, t) = (block % u64::from(dims.grid[0]), thread % u64::from(dims.block[0]));
                    if !output.print(&format!("gpupool printf {tag}: block {b} thread {t}\n")) {
                        break 'blocks;
                    }
                }
            }
            Ok(())
        }
        "tally_add" => {
            let &[tally] = variables else {
                return Err(CallError::invalid_value("the built-in module's variables are not where run looks"));
            };
            let all = (0..3).map(|axis| threads(&dims, axis)).fold(1u64, u64::wrapping_mul);
            let mut bytes = [0u8; 8];
            mem.load(tally, &mut bytes)?;
            let sum = u64::from_le_bytes(bytes).wrapping_add(args.u64(0).wrapping_mul(all));
            mem.store(tally, &sum.to_le_bytes())
        }
        "check_below" => {
            // Every thread whose x index is `limit` or more asserts, with the
            // message the driver prints (block by block, thread by thread
            // here; a GPU prints them in no fixed order).
            let limit = u64::from(args.u32(0));
            let (g, b) = (dims.grid, dims.block);
            let mut failed = false;
            'all: for (bz, by, bx) in grid_order(g) {
                for (tz, ty, tx) in grid_order(b) {
                    if u64::from(bx) * u64::from(b[0]) + u64::from(tx) < limit {
                        continue;
                    }
                    failed = true;
                    let line = check_below_message([bx, by, bz], [tx, ty, tz]);
                    if !output.assert_failed(&line) {
                        break 'all;
                    }
                }
            }
            if failed { Err(CallError::new(cuda::ASSERT, "device-side assert triggered")) } else { Ok(()) }
        }
        other => Err(CallError::new(cuda::NOT_FOUND, format!("no reference for built-in {other}"))),
    }
}

/// The message the driver prints when thread `thread` of block `block`
/// fails `check_below`'s assert: NVRTC compiles [`SOURCE`] as
/// `gpupool_builtin.cu` (the CUDA device's `nvrtc.rs`), so the file, line
/// and function are those of the source.
pub fn check_below_message(block: [u32; 3], thread: [u32; 3]) -> String {
    static LINE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let line = LINE.get_or_init(|| SOURCE.lines().position(|l| l.contains("assert(i < limit);")).map_or(0, |i| i + 1));
    let ([bx, by, bz], [tx, ty, tz]) = (block, thread);
    format!(
        "gpupool_builtin.cu:{line}: void check_below(unsigned int): block: [{bx},{by},{bz}], thread: [{tx},{ty},{tz}] Assertion `i < limit` failed.\n"
    )
}

/// The (z, y, x) indices of `dims`, x fastest.
fn grid_order(dims: [u32; 3]) -> impl Iterator<Item = (u32, u32, u32)> {
    (0..dims[2]).flat_map(move |z| (0..dims[1]).flat_map(move |y| (0..dims[0]).map(move |x| (z, y, x))))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn builtin_image_with_or_without_nul() {
        let mut c_string = gpupool_proto::BUILTIN_MODULE.to_vec();
        assert!(is_builtin(&c_string));
        c_string.push(0);
        assert!(is_builtin(&c_string));
        c_string.push(0);
        assert!(!is_builtin(&c_string));
        assert!(!is_builtin(b"gpupool-builtin-kernels/v2\n"));
    }

    #[test]
    fn layouts_follow_natural_alignment() {
        let f = functions();
        let saxpy = f.iter().find(|f| f.name == "saxpy").expect("saxpy");
        assert_eq!(
            saxpy.params,
            vec![
                Param { offset: 0, size: 4 },
                Param { offset: 8, size: 8 },
                Param { offset: 16, size: 8 },
                Param { offset: 24, size: 4 },
            ]
        );
        assert_eq!(saxpy.params_size(), 28);
        let mm = f.iter().find(|f| f.name == "matmul_f32").expect("matmul");
        assert_eq!(mm.params_size(), 36);
    }

    /// Memory that has everything (reads zeros) and keeps nothing.
    struct Anything;
    impl Memory for Anything {
        fn load(&self, _addr: u64, out: &mut [u8]) -> DeviceResult<()> {
            out.fill(0);
            Ok(())
        }
        fn store(&mut self, _addr: u64, _data: &[u8]) -> DeviceResult<()> {
            Ok(())
        }
    }

    fn index_of(name: &str) -> usize {
        functions().iter().position(|f| f.name == name).expect("built-in")
    }

    fn matmul_params(m: u32, n: u32, k: u32) -> Vec<u8> {
        let mut p = vec![0u8; 36];
        p[24..28].copy_from_slice(&m.to_le_bytes());
        p[28..32].copy_from_slice(&n.to_le_bytes());
        p[32..36].copy_from_slice(&k.to_le_bytes());
        p
    }

    /// Issue 20, finding 8: sizes from the wire that indexed out of bounds
    /// (m = n = k = 2^31) or asked for a 64 GiB vector (2^17) are refused
    /// with an error, never a panic or an abort.
    #[test]
    fn reference_kernels_refuse_what_they_cannot_hold() {
        let big = LaunchDims { grid: [u32::MAX, 65535, 1], block: [1024, 1, 1], shared_mem_bytes: 0 };
        let mut fifo = DeviceOutput::default();
        for (m, n, k) in
            [(1 << 31, 1 << 31, 1 << 31), (1 << 17, 1 << 17, 1 << 17), (u32::MAX, 1, 1), (4096, 4096, 4096)]
        {
            let r = run(index_of("matmul_f32"), big, &matmul_params(m, n, k), &mut Anything, &mut fifo, &[]);
            assert_eq!(r.map_err(|e| e.code), Err(cuda::INVALID_VALUE), "matmul {m}x{n}x{k}");
        }
        let small = LaunchDims { grid: [2, 2, 1], block: [16, 16, 1], shared_mem_bytes: 0 };
        assert!(run(index_of("matmul_f32"), small, &matmul_params(32, 32, 32), &mut Anything, &mut fifo, &[]).is_ok());
        let mut add = vec![0u8; 28];
        add[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let r = run(index_of("vector_add"), big, &add, &mut Anything, &mut fifo, &[]);
        assert_eq!(r.map_err(|e| e.code), Err(cuda::INVALID_VALUE), "vector_add of 2^32 elements");
    }

    #[test]
    fn check_below_asserts_for_threads_at_or_past_the_limit() {
        let dims = LaunchDims { grid: [2, 1, 1], block: [4, 1, 1], shared_mem_bytes: 0 };
        let mut fifo = DeviceOutput { capacity: 1 << 20, ..DeviceOutput::default() };
        let limit = |n: u32| n.to_le_bytes().to_vec();
        assert!(run(index_of("check_below"), dims, &limit(8), &mut Anything, &mut fifo, &[]).is_ok());
        assert!(fifo.stderr.is_empty());
        let r = run(index_of("check_below"), dims, &limit(7), &mut Anything, &mut fifo, &[]);
        assert_eq!(r.map_err(|e| e.code), Err(cuda::ASSERT));
        let text = String::from_utf8(std::mem::take(&mut fifo.stderr)).expect("text");
        assert_eq!(text, check_below_message([1, 0, 0], [3, 0, 0]));
        // The line is the assert's in the source NVRTC compiles.
        let line = SOURCE.lines().position(|l| l.contains("assert(i < limit);")).expect("the assert") + 1;
        assert!(text.starts_with(&format!("gpupool_builtin.cu:{line}: void check_below(unsigned int): ")), "{text}");
    }

    #[test]
    fn source_defines_every_kernel() {
        for (name, _) in KERNELS {
            assert!(SOURCE.contains(&format!("void {name}(")), "{name} missing from builtin.cu");
        }
        for (name, _) in VARIABLES {
            assert!(SOURCE.contains(&format!("__device__ unsigned long long {name};")), "{name} missing");
        }
    }
}
