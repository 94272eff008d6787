// Which earlier device-side launch makes a later child grid's printf go missing through gpupool?
// Usage: cdp_bisect STEP...   (steps: forget tail recurse parent; each followed by says)
#include <cstdio>
#include <cstring>
__global__ void child_fill(int *out, int base, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[base + i] = (base + i) * 3 + 1; }
__global__ void parent(int *out, int per) { if (threadIdx.x == 0) child_fill<<<(per + 127) / 128, 128>>>(out, blockIdx.x * per, per); }
__global__ void recurse(int *marks, int depth) { if (threadIdx.x == 0) { marks[depth] = depth * 10 + 7; if (depth > 0) recurse<<<1, 32>>>(marks, depth - 1); } }
__global__ void sum_after(const int *d, int n, long long *s) { long long t = 0; for (int i = 0; i < n; ++i) t += d[i]; *s = t; }
__global__ void fill_then_sum(int *d, int n, long long *s) { if (threadIdx.x == 0) { child_fill<<<(n + 255) / 256, 256>>>(d, 0, n); sum_after<<<1, 1, 0, cudaStreamTailLaunch>>>(d, n, s); } }
__global__ void set_flag(int *f, int who) { f[who] = who + 100; }
__global__ void forget(int *f) { if (threadIdx.x == 0) set_flag<<<1, 1, 0, cudaStreamFireAndForget>>>(f, blockIdx.x); }
__global__ void say(int tag) { printf("child says %d\n", tag); }
__global__ void parent_says(int tag) { if (threadIdx.x == 0 && blockIdx.x == 0) say<<<1, 1>>>(tag); }
int main(int argc, char **argv) {
    int *out, *marks, *flags; long long *sum; int n = 64000;
    cudaMalloc(&out, n * 4); cudaMalloc(&marks, 64); cudaMalloc(&flags, 256); cudaMalloc(&sum, 8);
    parent_says<<<3, 32>>>(0); printf("sync 0: %d\n", (int)cudaDeviceSynchronize()); fflush(stdout);
    for (int a = 1; a < argc; ++a) {
        if (!strcmp(argv[a], "forget")) forget<<<64, 32>>>(flags);
        else if (!strcmp(argv[a], "tail")) fill_then_sum<<<1, 32>>>(out, n, sum);
        else if (!strcmp(argv[a], "recurse")) recurse<<<1, 32>>>(marks, 7);
        else if (!strcmp(argv[a], "parent")) parent<<<64, 32>>>(out, 1000);
        printf("%s: launch %d sync %d\n", argv[a], (int)cudaGetLastError(), (int)cudaDeviceSynchronize());
        parent_says<<<3, 32>>>(a); printf("sync %d: %d\n", a, (int)cudaDeviceSynchronize()); fflush(stdout);
    }
    printf("last error %d\n", (int)cudaGetLastError());
    return 0;
}
