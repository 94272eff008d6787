// cusolver_dense: cuSOLVER's dense solvers on a 200 x 200 system, as CUDA's
// cuSolverDn examples use them: LU with partial pivoting (getrf/getrs),
// Cholesky (potrf/potrs), QR (geqrf, ormqr, then cuBLAS trsm), the
// symmetric eigensolver (syevd) and the SVD (gesvd); each result checked
// against the matrix it came from (residuals), the info words checked, and
// rounded invariants printed.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#define NAME "cusolver_dense"

#include "check.h"
#include "check_cublas.h"

#define CKSV(call)                                                            \
    do {                                                                      \
        cusolverStatus_t s_ = (call);                                         \
        if (s_ != CUSOLVER_STATUS_SUCCESS)                                    \
            fail("line %d: %s -> cuSOLVER status %d", __LINE__, #call,       \
                 (int)s_);                                                    \
    } while (0)

static const int n = 200;

// Column-major n x n.
static double &at(std::vector<double> &m, int r, int c)
{
    return m[(size_t)c * n + r];
}

static double residual(const std::vector<double> &a,
                       const std::vector<double> &x,
                       const std::vector<double> &b)
{
    double worst = 0.0;
    for (int r = 0; r < n; r++) {
        double acc = 0.0;
        for (int c = 0; c < n; c++)
            acc += a[(size_t)c * n + r] * x[c];
        worst = std::fmax(worst, std::fabs(acc - b[r]));
    }
    return worst;
}

struct Device {
    cusolverDnHandle_t dn;
    cublasHandle_t bl;
    cudaStream_t stream;
    double *a, *b, *work;
    int *ipiv, *info;
    int lwork = 0;
};

static void upload(Device &d, const std::vector<double> &a,
                   const std::vector<double> &b)
{
    CK(cudaMemcpyAsync(d.a, a.data(), a.size() * sizeof(double),
                       cudaMemcpyHostToDevice, d.stream));
    CK(cudaMemcpyAsync(d.b, b.data(), b.size() * sizeof(double),
                       cudaMemcpyHostToDevice, d.stream));
}

static void ensure_work(Device &d, int lwork)
{
    if (lwork <= d.lwork) return;
    if (d.work) CK(cudaFree(d.work));
    CK(cudaMalloc(&d.work, (size_t)lwork * sizeof(double)));
    d.lwork = lwork;
}

static void check_info(Device &d, const char *what)
{
    int info = -1;
    CK(cudaMemcpyAsync(&info, d.info, sizeof(int), cudaMemcpyDeviceToHost,
                       d.stream));
    CK(cudaStreamSynchronize(d.stream));
    if (info != 0) fail("%s: info %d", what, info);
}

static std::vector<double> download(Device &d, const double *src, size_t count)
{
    std::vector<double> out(count);
    CK(cudaMemcpyAsync(out.data(), src, count * sizeof(double),
                       cudaMemcpyDeviceToHost, d.stream));
    CK(cudaStreamSynchronize(d.stream));
    return out;
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::vector<double> a((size_t)n * n), spd((size_t)n * n), b(n);
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++)
            at(a, r, c) = std::sin(0.37 * r + 1.3 * c) + (r == c ? 8.0 : 0.0);
    for (int r = 0; r < n; r++) b[r] = std::cos(0.11 * r);
    // spd = a^T a / n + I
    for (int c = 0; c < n; c++)
        for (int r = 0; r < n; r++) {
            double acc = 0.0;
            for (int k = 0; k < n; k++) acc += at(a, k, r) * at(a, k, c);
            at(spd, r, c) = acc / n + (r == c ? 1.0 : 0.0);
        }

    Device d{};
    CKSV(cusolverDnCreate(&d.dn));
    CKB(cublasCreate(&d.bl));
    CK(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
    CKSV(cusolverDnSetStream(d.dn, d.stream));
    CKB(cublasSetStream(d.bl, d.stream));
    int major = 0, minor = 0, patch = 0;
    cusolverGetProperty(MAJOR_VERSION, &major);
    cusolverGetProperty(MINOR_VERSION, &minor);
    cusolverGetProperty(PATCH_LEVEL, &patch);
    printf("INFO cuSOLVER %d.%d.%d\n", major, minor, patch);
    CK(cudaMalloc(&d.a, (size_t)n * n * sizeof(double)));
    CK(cudaMalloc(&d.b, (size_t)n * sizeof(double)));
    CK(cudaMalloc(&d.ipiv, n * sizeof(int)));
    CK(cudaMalloc(&d.info, sizeof(int)));

    // LU: getrf then getrs.
    int lwork = 0;
    upload(d, a, b);
    CKSV(cusolverDnDgetrf_bufferSize(d.dn, n, n, d.a, n, &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDgetrf(d.dn, n, n, d.a, n, d.work, d.ipiv, d.info));
    check_info(d, "getrf");
    CKSV(cusolverDnDgetrs(d.dn, CUBLAS_OP_N, n, 1, d.a, n, d.ipiv, d.b, n,
                          d.info));
    check_info(d, "getrs");
    std::vector<double> x = download(d, d.b, n);
    double res = residual(a, x, b);
    if (!(res < 1e-10)) fail("LU solve: residual %g", res);
    printf("LU (getrf/getrs): residual below 1e-10, x[0] %.6f\n", x[0]);

    // Cholesky: potrf then potrs.
    upload(d, spd, b);
    CKSV(cusolverDnDpotrf_bufferSize(d.dn, CUBLAS_FILL_MODE_LOWER, n, d.a, n,
                                     &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDpotrf(d.dn, CUBLAS_FILL_MODE_LOWER, n, d.a, n, d.work,
                          lwork, d.info));
    check_info(d, "potrf");
    CKSV(cusolverDnDpotrs(d.dn, CUBLAS_FILL_MODE_LOWER, n, 1, d.a, n, d.b, n,
                          d.info));
    check_info(d, "potrs");
    x = download(d, d.b, n);
    res = residual(spd, x, b);
    if (!(res < 1e-10)) fail("Cholesky solve: residual %g", res);
    printf("Cholesky (potrf/potrs): residual below 1e-10, x[0] %.6f\n", x[0]);

    // QR: geqrf, Q^T b with ormqr, then R x = Q^T b with cuBLAS trsm.
    double *tau;
    CK(cudaMalloc(&tau, n * sizeof(double)));
    upload(d, a, b);
    CKSV(cusolverDnDgeqrf_bufferSize(d.dn, n, n, d.a, n, &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDgeqrf(d.dn, n, n, d.a, n, tau, d.work, lwork, d.info));
    check_info(d, "geqrf");
    CKSV(cusolverDnDormqr_bufferSize(d.dn, CUBLAS_SIDE_LEFT, CUBLAS_OP_T, n, 1,
                                     n, d.a, n, tau, d.b, n, &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDormqr(d.dn, CUBLAS_SIDE_LEFT, CUBLAS_OP_T, n, 1, n, d.a, n,
                          tau, d.b, n, d.work, lwork, d.info));
    check_info(d, "ormqr");
    const double one = 1.0;
    CKB(cublasDtrsm(d.bl, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER,
                    CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, n, 1, &one, d.a, n,
                    d.b, n));
    x = download(d, d.b, n);
    res = residual(a, x, b);
    if (!(res < 1e-10)) fail("QR solve: residual %g", res);
    printf("QR (geqrf/ormqr/trsm): residual below 1e-10\n");

    // Symmetric eigenvalues and vectors: A v = lambda v for each pair.
    double *w;
    CK(cudaMalloc(&w, n * sizeof(double)));
    upload(d, spd, b);
    CKSV(cusolverDnDsyevd_bufferSize(d.dn, CUSOLVER_EIG_MODE_VECTOR,
                                     CUBLAS_FILL_MODE_LOWER, n, d.a, n, w,
                                     &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDsyevd(d.dn, CUSOLVER_EIG_MODE_VECTOR,
                          CUBLAS_FILL_MODE_LOWER, n, d.a, n, w, d.work, lwork,
                          d.info));
    check_info(d, "syevd");
    std::vector<double> vecs = download(d, d.a, (size_t)n * n);
    std::vector<double> vals = download(d, w, n);
    double worst = 0.0, trace = 0.0, sum = 0.0;
    for (int j = 0; j < n; j++) {
        for (int r = 0; r < n; r++) {
            double acc = 0.0;
            for (int c = 0; c < n; c++) acc += at(spd, r, c) * at(vecs, c, j);
            worst = std::fmax(worst, std::fabs(acc - vals[j] * at(vecs, r, j)));
        }
        trace += at(spd, j, j);
        sum += vals[j];
    }
    if (!(worst < 1e-9)) fail("syevd: |A v - lambda v| up to %g", worst);
    if (!(std::fabs(trace - sum) < 1e-8 * trace))
        fail("syevd: eigenvalues sum to %.12g, trace %.12g", sum, trace);
    if (!std::is_sorted(vals.begin(), vals.end()))
        fail("syevd: eigenvalues not ascending");
    printf("syevd: %d pairs, smallest %.6f, largest %.6f\n", n, vals[0],
           vals[n - 1]);

    // SVD: singular values only; their squares sum to the Frobenius norm^2.
    double *s;
    CK(cudaMalloc(&s, n * sizeof(double)));
    upload(d, a, b);
    CKSV(cusolverDnDgesvd_bufferSize(d.dn, n, n, &lwork));
    ensure_work(d, lwork);
    CKSV(cusolverDnDgesvd(d.dn, 'N', 'N', n, n, d.a, n, s, nullptr, n,
                          nullptr, n, d.work, lwork, nullptr, d.info));
    check_info(d, "gesvd");
    std::vector<double> sv = download(d, s, n);
    double frob = 0.0, sq = 0.0;
    for (double v : a) frob += v * v;
    for (double v : sv) sq += v * v;
    if (!(std::fabs(frob - sq) < 1e-9 * frob))
        fail("gesvd: sum of squares %.12g, Frobenius^2 %.12g", sq, frob);
    printf("gesvd: largest %.6f, smallest %.6f\n", sv[0], sv[n - 1]);

    for (void *p : {(void *)d.a, (void *)d.b, (void *)d.work, (void *)d.ipiv,
                    (void *)d.info, (void *)tau, (void *)w, (void *)s})
        CK(cudaFree(p));
    CKSV(cusolverDnDestroy(d.dn));
    CKB(cublasDestroy(d.bl));
    CK(cudaStreamDestroy(d.stream));
    printf("PASS " NAME "\n");
    return 0;
}
