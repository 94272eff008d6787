// managed_kernels: kernels on managed memory, as CUDA tutorials write them
// (a GPU program). cudaMallocManaged, the host initializes, kernels update,
// the host reads after synchronizing; prefetch both ways; several kernels
// in a row without host synchronization between them; a linked list built
// on the host and walked by the device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>

#define NAME "managed_kernels"

#include "check.h"

#include "check_bytes.h"

__global__ void add(int n, const float *x, float *y)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] = x[i] + y[i];
}

__global__ void scale(int n, float *y, float a)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        y[i] *= a;
}

struct Node {
    int value;
    Node *next;
};

__global__ void walk(const Node *head, int *sum)
{
    int s = 0;
    for (const Node *p = head; p; p = p->next)
        s += p->value;
    *sum = s;
}

int main()
{
    const int n = 1 << 20;
    float *x = nullptr, *y = nullptr;
    CK(cudaMallocManaged(&x, n * sizeof(float)));
    CK(cudaMallocManaged(&y, n * sizeof(float)));
    for (int i = 0; i < n; i++) {
        x[i] = 1.0f;
        y[i] = 2.0f;
    }
    add<<<256, 256>>>(n, x, y);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    float max_error = 0.0f;
    for (int i = 0; i < n; i++)
        max_error = fmaxf(max_error, fabsf(y[i] - 3.0f));
    REQUIRE(max_error == 0.0f, "add: max error %f", max_error);
    printf("add: max error %f\n", max_error);

    // The host changes some inputs; several kernels run before it looks.
    for (int i = 0; i < n; i += 3)
        x[i] = 2.0f;
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    int concurrent = 0;
    CK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, 0));
    cudaMemLocation dev{};
    dev.type = cudaMemLocationTypeDevice;
    dev.id = 0;
    cudaMemLocation host{};
    host.type = cudaMemLocationTypeHost;
    if (concurrent) {
        CK(cudaMemPrefetchAsync(x, n * sizeof(float), dev, 0, s));
        CK(cudaMemPrefetchAsync(y, n * sizeof(float), dev, 0, s));
    }
    add<<<256, 256, 0, s>>>(n, x, y);
    scale<<<256, 256, 0, s>>>(n, y, 0.5f);
    add<<<256, 256, 0, s>>>(n, x, y);
    if (concurrent)
        CK(cudaMemPrefetchAsync(y, n * sizeof(float), host, 0, s));
    CK(cudaStreamSynchronize(s));
    for (int i = 0; i < n; i++) {
        float xi = (i % 3 == 0) ? 2.0f : 1.0f;
        float want = (3.0f + xi) * 0.5f + xi;
        REQUIRE(y[i] == want, "chain: y[%d] = %f, want %f", i, y[i], want);
    }
    bytes_checked += n * sizeof(float);
    printf("chain of kernels: %d elements right\n", n);

    // A linked list in managed memory: pointers are the same on both sides.
    Node *nodes = nullptr;
    int *sum = nullptr;
    CK(cudaMallocManaged(&nodes, 100 * sizeof(Node)));
    CK(cudaMallocManaged(&sum, sizeof(int)));
    int want = 0;
    for (int i = 0; i < 100; i++) {
        nodes[i].value = i * 7 % 13;
        nodes[i].next = i + 1 < 100 ? &nodes[i + 1] : nullptr;
        want += nodes[i].value;
    }
    *sum = -1;
    walk<<<1, 1>>>(nodes, sum);
    CK(cudaDeviceSynchronize());
    REQUIRE(*sum == want, "list sum %d, want %d", *sum, want);
    printf("linked list: sum %d\n", *sum);

    CK(cudaStreamDestroy(s));
    CK(cudaFree(nodes));
    CK(cudaFree(sum));
    CK(cudaFree(x));
    CK(cudaFree(y));
    printf("PASS " NAME "\n");
    return 0;
}
