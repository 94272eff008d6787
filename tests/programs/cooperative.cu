// cooperative: a grid-wide reduction with cooperative_groups' grid.sync()
// launched by cudaLaunchCooperativeKernel (as large a grid as can be
// co-resident, from the occupancy API), a grid one block too large for a
// cooperative launch (refused at the launch, nothing latched), and a
// thread-block-cluster launch through cudaLaunchKernelEx with cluster
// dimensions and distributed shared memory. The cluster part needs sm_90
// code: the `.sm90` build runs it, the default build (sm_75 PTX) says so.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#define NAME "cooperative"

#include "check.h"

namespace cg = cooperative_groups;

constexpr int kThreads = 256;

__global__ void reduce(const int *in, int n, long long *partial, long long *total)
{
    cg::grid_group grid = cg::this_grid();
    __shared__ long long block_sum[kThreads];
    long long s = 0;
    for (int i = grid.thread_rank(); i < n; i += grid.size())
        s += in[i];
    block_sum[threadIdx.x] = s;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
        if (threadIdx.x < w)
            block_sum[threadIdx.x] += block_sum[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        partial[blockIdx.x] = block_sum[0];
    grid.sync();
    if (grid.thread_rank() == 0) {
        long long t = 0;
        for (unsigned b = 0; b < gridDim.x; b++)
            t += partial[b];
        *total = t;
    }
}

// Each block publishes its index in shared memory and reads its cluster
// partner's (rank ^ 1) through distributed shared memory.
__global__ void cluster_swap(int *out)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    __shared__ int mine;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0)
        mine = blockIdx.x;
    cluster.sync();
    int *peer = cluster.map_shared_rank(&mine, cluster.block_rank() ^ 1);
    if (threadIdx.x == 0)
        out[blockIdx.x] = *peer;
    cluster.sync();
#else
    if (threadIdx.x == 0)
        out[blockIdx.x] = -1;
#endif
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    int dev = 0, sms = 0, coop = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    CK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev));
    if (!coop)
        fail("the device does not report cooperative launch support");
    int per_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reduce, kThreads, 0));
    const int blocks = sms * per_sm;
    printf("INFO %d SMs x %d blocks of %d threads co-resident\n", sms, per_sm, kThreads);

    const int n = 1 << 22;
    std::vector<int> h(n);
    long long want = 0;
    for (int i = 0; i < n; i++) {
        h[i] = (i * 37) % 1001 - 500;
        want += h[i];
    }
    int *in = nullptr;
    long long *partial = nullptr, *total = nullptr;
    CK(cudaMalloc(&in, n * sizeof(int)));
    CK(cudaMalloc(&partial, (blocks + 1) * sizeof(long long)));
    CK(cudaMalloc(&total, sizeof(long long)));
    CK(cudaMemcpy(in, h.data(), n * sizeof(int), cudaMemcpyHostToDevice));
    int nn = n;
    void *args[] = {&in, &nn, &partial, &total};
    CK(cudaLaunchCooperativeKernel(reinterpret_cast<void *>(reduce), blocks, kThreads, args, 0, nullptr));
    long long got = 0;
    CK(cudaMemcpy(&got, total, sizeof got, cudaMemcpyDeviceToHost));
    if (got != want)
        fail("grid reduction: %lld, expected %lld", got, want);
    printf("cooperative grid.sync() reduction over the largest co-resident grid ok\n");

    cudaError_t e = cudaLaunchCooperativeKernel(reinterpret_cast<void *>(reduce), blocks + 1, kThreads, args, 0,
                                                nullptr);
    cudaError_t sync = cudaDeviceSynchronize();
    printf("one block too many: launch %s, sync %s\n", cudaGetErrorName(e), cudaGetErrorName(sync));
    (void)cudaGetLastError();
    if (e != cudaErrorCooperativeLaunchTooLarge || sync != cudaSuccess)
        fail("a cooperative grid too large to be co-resident must fail at the launch only");

    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, cluster_swap));
    // ptxVersion, not binaryVersion: the default build's compute_75 PTX is
    // JIT-compiled to sm_90 code without the cluster path.
    if (fa.ptxVersion < 90) {
        printf("cluster launch skipped: cluster_swap is compute_%d code (the .sm90 build runs it)\n",
               fa.ptxVersion);
    } else {
        const int cblocks = 16;
        int *out = nullptr;
        CK(cudaMalloc(&out, cblocks * sizeof(int)));
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(cblocks, 1, 1);
        cfg.blockDim = dim3(64, 1, 1);
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = 2;
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        CK(cudaLaunchKernelEx(&cfg, cluster_swap, out));
        CK(cudaDeviceSynchronize());
        int hout[cblocks];
        CK(cudaMemcpy(hout, out, sizeof hout, cudaMemcpyDeviceToHost));
        for (int b = 0; b < cblocks; b++)
            if (hout[b] != (b ^ 1))
                fail("cluster block %d read %d from its partner, expected %d", b, hout[b], b ^ 1);
        // A cluster that does not divide the grid is refused at the launch.
        attr[0].val.clusterDim.x = 3;
        e = cudaLaunchKernelEx(&cfg, cluster_swap, out);
        sync = cudaDeviceSynchronize();
        printf("cluster of 3 over 16 blocks: launch %s, sync %s\n", cudaGetErrorName(e), cudaGetErrorName(sync));
        (void)cudaGetLastError();
        if (e == cudaSuccess || sync != cudaSuccess)
            fail("a cluster that does not divide the grid must fail at the launch only");
        printf("cluster launch with distributed shared memory ok\n");
        CK(cudaFree(out));
    }
    CK(cudaFree(in));
    CK(cudaFree(partial));
    CK(cudaFree(total));
    printf("PASS " NAME "\n");
    return 0;
}
