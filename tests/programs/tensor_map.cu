// tensor_map: TMA descriptors. cuTensorMapEncodeTiled describes a 2-D
// float tensor in device memory; a Hopper kernel copies 16 x 16 tiles of it
// into shared memory with the bulk tensor copy engine and writes them back
// out, and cuTensorMapReplaceAddress points the same descriptor at a second
// tensor. Through gpupool the descriptor is encoded by the server's driver
// and travels as a 128-byte kernel parameter.
//
// The TMA path exists only in code compiled for sm_90 or later: the default
// build (sm_75 PTX JIT-compiled on the card) reports that it skipped it, the
// same way natively and through the stub.
#include <cuda.h>
#include <cuda/barrier>

#include <cstdio>
#include <vector>

#define NAME "tensor_map"

#include "check.h"

#include "driver_entry.h"

constexpr int TILE = 16;
constexpr int W = 128, H = 64;

// One block per tile: TMA brings the tile to shared memory, the threads
// copy it to `out` at the same place. `*ran` says whether the TMA path was
// compiled in.
__global__ void tiles(const __grid_constant__ CUtensorMap map, float *out, int *ran)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    using barrier = cuda::barrier<cuda::thread_scope_block>;
    namespace cde = cuda::device::experimental;
    __shared__ alignas(128) float tile[TILE][TILE];
#pragma nv_diag_suppress static_var_with_dynamic_init
    __shared__ barrier bar;
    const int x = blockIdx.x * TILE, y = blockIdx.y * TILE;
    if (threadIdx.x == 0) {
        init(&bar, blockDim.x);
        cde::fence_proxy_async_shared_cta();
    }
    __syncthreads();
    barrier::arrival_token token;
    if (threadIdx.x == 0) {
        cde::cp_async_bulk_tensor_2d_global_to_shared(&tile, &map, x, y, bar);
        token = cuda::device::barrier_arrive_tx(bar, 1, sizeof(tile));
    } else {
        token = bar.arrive();
    }
    bar.wait(std::move(token));
    for (int i = threadIdx.x; i < TILE * TILE; i += blockDim.x)
        out[(size_t)(y + i / TILE) * W + x + i % TILE] = tile[i / TILE][i % TILE];
    if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0)
        *ran = 1;
#else
    if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0)
        *ran = 0;
#endif
}

static void round_trip(const CUtensorMap *map, const std::vector<float> &want, float *out, int *ran, const char *what)
{
    CK(cudaMemset(out, 0, want.size() * sizeof(float)));
    tiles<<<dim3(W / TILE, H / TILE), 128>>>(*map, out, ran);
    CK_LAUNCH("tiles");
    CK(cudaDeviceSynchronize());
    int compiled = -1;
    CK(cudaMemcpy(&compiled, ran, sizeof compiled, cudaMemcpyDeviceToHost));
    if (compiled == 0) {
        printf("%s: TMA path not compiled for this architecture (skipped)\n", what);
        return;
    }
    std::vector<float> got(want.size());
    CK(cudaMemcpy(got.data(), out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < got.size(); i++)
        if (got[i] != want[i])
            fail("%s: element %zu is %g, expected %g", what, i, (double)got[i], (double)want[i]);
    printf("%s: %d x %d floats through %d TMA tiles of %d x %d match\n", what, W, H, (W / TILE) * (H / TILE), TILE,
           TILE);
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const size_t n = (size_t)W * H;
    std::vector<float> a(n), b(n);
    for (size_t i = 0; i < n; i++) {
        a[i] = (float)i;
        b[i] = -(float)(i % 1000) / 8.0f;
    }
    float *da, *db, *out;
    int *ran;
    CK(cudaMalloc(&da, n * sizeof(float)));
    CK(cudaMalloc(&db, n * sizeof(float)));
    CK(cudaMalloc(&out, n * sizeof(float)));
    CK(cudaMalloc(&ran, sizeof(int)));
    CK(cudaMemcpy(da, a.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, b.data(), n * sizeof(float), cudaMemcpyHostToDevice));

    auto encode = DRV(cuTensorMapEncodeTiled);
    auto replace = DRV(cuTensorMapReplaceAddress);
    alignas(64) CUtensorMap map;
    const cuuint64_t dims[2] = {W, H};
    const cuuint64_t strides[1] = {W * sizeof(float)};
    const cuuint32_t box[2] = {TILE, TILE};
    const cuuint32_t elem[2] = {1, 1};
    CKD(encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, da, dims, strides, box, elem,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    round_trip(&map, a, out, ran, "encoded map");
    CKD(replace(&map, db));
    round_trip(&map, b, out, ran, "replaced address");

    // A rank the driver does not have is refused.
    const cuuint64_t dims6[6] = {2, 2, 2, 2, 2, 2};
    const cuuint64_t strides6[5] = {8, 16, 32, 64, 128};
    const cuuint32_t box6[6] = {1, 1, 1, 1, 1, 1};
    const cuuint32_t elem6[6] = {1, 1, 1, 1, 1, 1};
    CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 6, da, dims6, strides6, box6, elem6,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    printf("rank 6: %s\n", r == CUDA_SUCCESS ? "accepted" : "refused");

    CK(cudaFree(da));
    CK(cudaFree(db));
    CK(cudaFree(out));
    CK(cudaFree(ran));
    printf("PASS " NAME "\n");
    return 0;
}
