// mem_ops_kernels: stream memory operations released by other work: a
// wait on one stream released by a write queued later on another stream
// behind a slow kernel; a wait released by a kernel's store; a kernel that
// reads what a stream write stored before it. The driver functions come
// from cudaGetDriverEntryPointByVersion, as runtime-API programs get them.
// Every word is checked on the host.
#include <cuda_runtime.h>

#include <cstdio>

#define NAME "mem_ops_kernels"

#include "check.h"
#include "driver_entry.h"

// Spins about `cycles` clock cycles, then stores `value`.
__global__ void slow_store(unsigned *out, unsigned value, long long cycles)
{
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
    *out = value;
}

// Stores `value` at `data`, then (after a fence) `flag_value` at `flag`.
__global__ void store_then_flag(unsigned *data, unsigned value, volatile unsigned *flag, unsigned flag_value,
                                long long cycles)
{
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
    *data = value;
    __threadfence_system();
    *flag = flag_value;
}

__global__ void add_one(const unsigned *src, unsigned *dst)
{
    *dst = *src + 1;
}

static unsigned word(const unsigned *at)
{
    unsigned v = 0;
    CK(cudaMemcpy(&v, at, sizeof v, cudaMemcpyDeviceToHost));
    return v;
}

int main()
{
    auto wait32 = DRV(cuStreamWaitValue32);
    auto write32 = DRV(cuStreamWriteValue32);
    unsigned *buf;
    CK(cudaMalloc(&buf, 64 * sizeof(unsigned)));
    CK(cudaMemset(buf, 0, 64 * sizeof(unsigned)));
    cudaStream_t a, b;
    CK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    // Every kernel runs once first: with lazy loading (CUDA's default) a
    // kernel's first launch loads it, which would wait for the stream
    // that waits on it.
    slow_store<<<1, 1>>>(buf + 32, 0, 0);
    store_then_flag<<<1, 1>>>(buf + 33, 0, buf + 34, 0, 0);
    add_one<<<1, 1>>>(buf + 35, buf + 36);
    CK_LAUNCH("warm-up");
    CK(cudaDeviceSynchronize());

    // Stream a waits for word 0 to reach 1, then adds one to word 1 into
    // word 2; stream b stores 41 in word 1 after a slow kernel, then 1 in
    // word 0: a's kernel can only have run after both.
    for (int round = 0; round < 3; ++round) {
        CK(cudaMemset(buf, 0, 16));
        CKD(wait32((CUstream)a, (CUdeviceptr)buf, round + 1, CU_STREAM_WAIT_VALUE_GEQ));
        add_one<<<1, 1, 0, a>>>(buf + 1, buf + 2);
        CK_LAUNCH("add_one");
        slow_store<<<1, 1, 0, b>>>(buf + 1, 41 + round, 2000000);
        CK_LAUNCH("slow_store");
        CKD(write32((CUstream)b, (CUdeviceptr)buf, round + 1, CU_STREAM_WRITE_VALUE_DEFAULT));
        CK(cudaStreamSynchronize(a));
        CK(cudaStreamSynchronize(b));
        if (word(buf + 2) != 42u + round)
            fail("round %d: the waiting stream computed %u, expected %u", round, word(buf + 2), 42 + round);
    }
    printf("waits released by another stream's write: ok\n");

    // Released by device code: a kernel on b stores data, then the flag.
    CKD(wait32((CUstream)a, (CUdeviceptr)(buf + 4), 7, CU_STREAM_WAIT_VALUE_EQ));
    add_one<<<1, 1, 0, a>>>(buf + 5, buf + 6);
    CK_LAUNCH("add_one");
    store_then_flag<<<1, 1, 0, b>>>(buf + 5, 9, buf + 4, 7, 1000000);
    CK_LAUNCH("store_then_flag");
    CK(cudaDeviceSynchronize());
    if (word(buf + 6) != 10)
        fail("a wait released by a kernel: computed %u, expected 10", word(buf + 6));
    printf("a wait released by a kernel: ok\n");

    // A stream write read by a kernel after it.
    CKD(write32((CUstream)a, (CUdeviceptr)(buf + 8), 1234, CU_STREAM_WRITE_VALUE_DEFAULT));
    add_one<<<1, 1, 0, a>>>(buf + 8, buf + 9);
    CK_LAUNCH("add_one");
    CK(cudaStreamSynchronize(a));
    if (word(buf + 9) != 1235)
        fail("a kernel after a stream write read %u", word(buf + 9) - 1);
    printf("a kernel reads a stream write: ok\n");

    CK(cudaStreamDestroy(a));
    CK(cudaStreamDestroy(b));
    CK(cudaFree(buf));
    printf("PASS " NAME "\n");
    return 0;
}
