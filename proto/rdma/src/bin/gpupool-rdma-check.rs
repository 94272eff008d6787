//! Runs the RDMA integration check and prints one line: `passed: …`,
//! `skipped: no RDMA device …`, or `failed: …` (exit 1). The GPU suite
//! runs it on the GPU machine (`bench/gpu-suite.sh`, step `rdma`).

fn main() {
    match gpupool_rdma::check::run() {
        Ok(outcome) => println!("rdma check {outcome}"),
        Err(e) => {
            println!("rdma check failed: {e}");
            std::process::exit(1);
        }
    }
}
