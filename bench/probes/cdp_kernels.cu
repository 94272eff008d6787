// Device printf from child grids (CDP): kernels for cdp_probe.c (linked cubin, extern "C" names).
#include <cstdio>
extern "C" __global__ void child(int v) { printf("child printf %d\n", v); }
extern "C" __global__ void parent(int v) { if (threadIdx.x == 0) child<<<1, 1>>>(v); }
extern "C" __global__ void direct(int v) { printf("direct printf %d\n", v); }
