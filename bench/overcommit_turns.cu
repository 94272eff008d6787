// One tenant of the GPU overcommit check (bench/overcommit-gpu.sh, issue 21):
// an unmodified CUDA runtime program that holds MIB MiB of device memory and
// uses it in turns with the other tenants. The memory of all tenants
// together does not fit the server's device bound, so every turn brings this
// one's memory back in after the others swapped it out.
//
// Usage: overcommit_turns MIB DIR ID ROUNDS
//   Fills the buffer from a hash of each index, then for each round r waits
//   for DIR/turn-ID-r, advances every word one step of a recurrence, checks
//   every word on the device against the value recomputed from its index,
//   checks a strided sample on the host too, prints one line
//   "TURN ID r ms mismatches kernels_ms sample_ms" (the turn's time, then
//   its two parts: the kernels up to the mismatch count's copy, and the
//   strided sample's cudaMemcpy2D) and creates DIR/done-ID-r. Exits 1 at the
//   first mismatch or CUDA error.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHECK(call)                                                                     \
    do {                                                                                \
        cudaError_t e_ = (call);                                                        \
        if (e_ != cudaSuccess) {                                                        \
            fprintf(stderr, "tenant: %s failed: %s\n", #call, cudaGetErrorString(e_)); \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

__host__ __device__ static unsigned start_value(size_t i, unsigned seed) {
    unsigned x = (unsigned)(i * 2654435761u) ^ seed;
    x ^= x >> 16;
    x *= 0x45d9f3bu;
    return x ^ (x >> 16);
}

__host__ __device__ static unsigned advance(unsigned x, unsigned round) {
    return x * 1664525u + 1013904223u + round;
}

__host__ __device__ static unsigned expected(size_t i, unsigned seed, unsigned rounds) {
    unsigned x = start_value(i, seed);
    for (unsigned r = 0; r < rounds; r++) x = advance(x, r);
    return x;
}

__global__ void fill(unsigned *p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = start_value(i, seed);
}

__global__ void step(unsigned *p, size_t n, unsigned round) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = advance(p[i], round);
}

__global__ void check(const unsigned *p, size_t n, unsigned seed, unsigned rounds, unsigned long long *bad) {
    unsigned long long mine = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        mine += p[i] != expected(i, seed, rounds);
    if (mine) atomicAdd(bad, mine);
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void wait_for(const char *path) {
    struct stat st;
    double start = now_ms();
    while (stat(path, &st) != 0) {
        if (now_ms() - start > 600e3) {
            fprintf(stderr, "tenant: no %s within 600 s\n", path);
            exit(1);
        }
        usleep(2000);
    }
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MIB DIR ID ROUNDS\n", argv[0]);
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    const char *dir = argv[2];
    int id = atoi(argv[3]);
    unsigned rounds = (unsigned)atoi(argv[4]);
    unsigned seed = 0x9e3779b9u * (unsigned)(id + 1);
    size_t n = bytes / sizeof(unsigned);
    unsigned *p;
    unsigned long long *bad;
    CHECK(cudaMalloc(&p, n * sizeof(unsigned)));
    CHECK(cudaMalloc(&bad, sizeof *bad));
    fill<<<1024, 256>>>(p, n, seed);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    char path[4096];
    snprintf(path, sizeof path, "%s/ready-%d", dir, id);
    fclose(fopen(path, "w"));
    // A strided sample of the buffer, checked on the host after each turn.
    size_t stride = 4099, samples = n / stride;
    unsigned *sample = (unsigned *)malloc(samples * sizeof(unsigned));
    for (unsigned r = 0; r < rounds; r++) {
        snprintf(path, sizeof path, "%s/turn-%d-%u", dir, id, r);
        wait_for(path);
        double t0 = now_ms();
        step<<<1024, 256>>>(p, n, r);
        CHECK(cudaGetLastError());
        CHECK(cudaMemset(bad, 0, sizeof *bad));
        check<<<1024, 256>>>(p, n, seed, r + 1, bad);
        CHECK(cudaGetLastError());
        unsigned long long mismatches = 0;
        CHECK(cudaMemcpy(&mismatches, bad, sizeof mismatches, cudaMemcpyDeviceToHost));
        double t1 = now_ms();
        CHECK(cudaMemcpy2D(sample, sizeof(unsigned), p, stride * sizeof(unsigned), sizeof(unsigned), samples,
                           cudaMemcpyDeviceToHost));
        double t2 = now_ms();
        for (size_t k = 0; k < samples; k++)
            if (sample[k] != expected(k * stride, seed, r + 1)) mismatches++;
        printf("TURN %d %u %.1f %llu %.1f %.1f\n", id, r, now_ms() - t0, mismatches, t1 - t0, t2 - t1);
        fflush(stdout);
        if (mismatches) {
            fprintf(stderr, "tenant %d: %llu words differ after round %u\n", id, mismatches, r);
            return 1;
        }
        snprintf(path, sizeof path, "%s/done-%d-%u", dir, id, r);
        fclose(fopen(path, "w"));
    }
    CHECK(cudaFree(p));
    CHECK(cudaFree(bad));
    printf("tenant %d: %u rounds of %zu MiB, every word checked\n", id, rounds, bytes >> 20);
    return 0;
}
