// cusparse_cg: conjugate gradient on a sparse symmetric positive definite
// system (the 2D five-point Laplacian on a 64 x 64 grid plus a diagonal
// shift), with cuSPARSE's generic API for the matrix-vector products and
// cuBLAS for the vector operations, as CUDA's conjugate-gradient examples
// do; then a sparse-times-dense product (SpMM) and a sparse-to-dense
// conversion, each checked against the CPU.
//
// The right-hand side is made from a known solution, so the result is
// checked against it; the iteration count and rounded norms are printed
// (deterministic for a given GPU: CSR_ALG1 and cuBLAS's dot products do
// not depend on scheduling).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusparse.h>

#include <cmath>
#include <cstdio>
#include <vector>

#define NAME "cusparse_cg"

#include "check.h"
#include "check_cublas.h"

#define CKS(call) CK_STATUS(call, cusparseStatus_t, CUSPARSE_STATUS_SUCCESS, cusparseGetErrorName)

struct Csr {
    int n = 0;
    std::vector<int> rows, cols;
    std::vector<double> vals;
};

// The five-point Laplacian of a g x g grid, shifted by 0.5 on the diagonal.
static Csr laplacian(int g)
{
    Csr a;
    a.n = g * g;
    a.rows.push_back(0);
    for (int i = 0; i < g; i++)
        for (int j = 0; j < g; j++) {
            int row = i * g + j;
            auto put = [&](int col, double v) {
                a.cols.push_back(col);
                a.vals.push_back(v);
            };
            if (i > 0) put(row - g, -1.0);
            if (j > 0) put(row - 1, -1.0);
            put(row, 4.5);
            if (j < g - 1) put(row + 1, -1.0);
            if (i < g - 1) put(row + g, -1.0);
            a.rows.push_back((int)a.cols.size());
        }
    return a;
}

static void spmv_host(const Csr &a, const std::vector<double> &x,
                      std::vector<double> &y)
{
    for (int r = 0; r < a.n; r++) {
        double acc = 0.0;
        for (int k = a.rows[r]; k < a.rows[r + 1]; k++)
            acc += a.vals[k] * x[a.cols[k]];
        y[r] = acc;
    }
}

int main()
{
    setvbuf(stdout, nullptr, _IOLBF, 0);
    const int g = 64;
    Csr a = laplacian(g);
    const int n = a.n, nnz = (int)a.vals.size();
    printf("matrix %d x %d, %d nonzeros\n", n, n, nnz);

    std::vector<double> want(n), b(n);
    for (int i = 0; i < n; i++)
        want[i] = std::sin(0.01 * i) + (double)(i % 7) / 7.0;
    spmv_host(a, want, b);

    cusparseHandle_t sp;
    cublasHandle_t bl;
    cudaStream_t stream;
    CKS(cusparseCreate(&sp));
    CKB(cublasCreate(&bl));
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CKS(cusparseSetStream(sp, stream));
    CKB(cublasSetStream(bl, stream));
    int version = 0;
    CKS(cusparseGetVersion(sp, &version));
    printf("INFO cuSPARSE version %d\n", version);

    int *d_rows, *d_cols;
    double *d_vals, *d_x, *d_r, *d_p, *d_ap;
    CK(cudaMalloc(&d_rows, (n + 1) * sizeof(int)));
    CK(cudaMalloc(&d_cols, nnz * sizeof(int)));
    CK(cudaMalloc(&d_vals, nnz * sizeof(double)));
    for (double **v : {&d_x, &d_r, &d_p, &d_ap})
        CK(cudaMalloc(v, n * sizeof(double)));
    CK(cudaMemcpyAsync(d_rows, a.rows.data(), (n + 1) * sizeof(int),
                       cudaMemcpyHostToDevice, stream));
    CK(cudaMemcpyAsync(d_cols, a.cols.data(), nnz * sizeof(int),
                       cudaMemcpyHostToDevice, stream));
    CK(cudaMemcpyAsync(d_vals, a.vals.data(), nnz * sizeof(double),
                       cudaMemcpyHostToDevice, stream));
    CK(cudaMemsetAsync(d_x, 0, n * sizeof(double), stream));
    CK(cudaMemcpyAsync(d_r, b.data(), n * sizeof(double),
                       cudaMemcpyHostToDevice, stream));
    CK(cudaMemcpyAsync(d_p, b.data(), n * sizeof(double),
                       cudaMemcpyHostToDevice, stream));

    cusparseSpMatDescr_t mat;
    cusparseDnVecDescr_t vp, vap;
    CKS(cusparseCreateCsr(&mat, n, n, nnz, d_rows, d_cols, d_vals,
                          CUSPARSE_INDEX_32I, CUSPARSE_INDEX_32I,
                          CUSPARSE_INDEX_BASE_ZERO, CUDA_R_64F));
    CKS(cusparseCreateDnVec(&vp, n, d_p, CUDA_R_64F));
    CKS(cusparseCreateDnVec(&vap, n, d_ap, CUDA_R_64F));
    const double one = 1.0, zero = 0.0;
    size_t buffer_bytes = 0;
    CKS(cusparseSpMV_bufferSize(sp, CUSPARSE_OPERATION_NON_TRANSPOSE, &one,
                                mat, vp, &zero, vap, CUDA_R_64F,
                                CUSPARSE_SPMV_CSR_ALG1, &buffer_bytes));
    void *buffer = nullptr;
    CK(cudaMalloc(&buffer, buffer_bytes > 0 ? buffer_bytes : 1));

    double rr = 0.0, b_norm = 0.0;
    CKB(cublasDnrm2(bl, n, d_r, 1, &b_norm));
    CKB(cublasDdot(bl, n, d_r, 1, d_r, 1, &rr));
    int iterations = 0;
    const double tolerance = 1e-10;
    while (iterations < 1000 && std::sqrt(rr) > tolerance * b_norm) {
        CKS(cusparseSpMV(sp, CUSPARSE_OPERATION_NON_TRANSPOSE, &one, mat, vp,
                         &zero, vap, CUDA_R_64F, CUSPARSE_SPMV_CSR_ALG1,
                         buffer));
        double pap = 0.0;
        CKB(cublasDdot(bl, n, d_p, 1, d_ap, 1, &pap));
        double alpha = rr / pap, neg_alpha = -alpha;
        CKB(cublasDaxpy(bl, n, &alpha, d_p, 1, d_x, 1));
        CKB(cublasDaxpy(bl, n, &neg_alpha, d_ap, 1, d_r, 1));
        double rr_next = 0.0;
        CKB(cublasDdot(bl, n, d_r, 1, d_r, 1, &rr_next));
        double beta = rr_next / rr;
        // p = r + beta p
        CKB(cublasDscal(bl, n, &beta, d_p, 1));
        CKB(cublasDaxpy(bl, n, &one, d_r, 1, d_p, 1));
        rr = rr_next;
        iterations++;
    }
    std::vector<double> x(n);
    CK(cudaMemcpyAsync(x.data(), d_x, n * sizeof(double),
                       cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    double err = 0.0;
    for (int i = 0; i < n; i++)
        err = std::fmax(err, std::fabs(x[i] - want[i]));
    if (!(err < 1e-8))
        fail("CG after %d iterations: max error %g", iterations, err);
    printf("CG: converged in %d iterations, max error below 1e-8\n",
           iterations);

    // SpMM: the matrix times a dense n x 3 block (column-major).
    const int k = 3;
    std::vector<double> dense((size_t)n * k), product((size_t)n * k),
        expect((size_t)n * k);
    for (size_t i = 0; i < dense.size(); i++)
        dense[i] = (double)((i * 13) % 11) - 5.0;
    for (int c = 0; c < k; c++) {
        std::vector<double> col(dense.begin() + (size_t)c * n,
                                dense.begin() + (size_t)(c + 1) * n),
            out(n);
        spmv_host(a, col, out);
        std::copy(out.begin(), out.end(), expect.begin() + (size_t)c * n);
    }
    double *d_dense, *d_product;
    CK(cudaMalloc(&d_dense, dense.size() * sizeof(double)));
    CK(cudaMalloc(&d_product, product.size() * sizeof(double)));
    CK(cudaMemcpyAsync(d_dense, dense.data(), dense.size() * sizeof(double),
                       cudaMemcpyHostToDevice, stream));
    cusparseDnMatDescr_t md, mp;
    CKS(cusparseCreateDnMat(&md, n, k, n, d_dense, CUDA_R_64F,
                            CUSPARSE_ORDER_COL));
    CKS(cusparseCreateDnMat(&mp, n, k, n, d_product, CUDA_R_64F,
                            CUSPARSE_ORDER_COL));
    size_t spmm_bytes = 0;
    CKS(cusparseSpMM_bufferSize(sp, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                CUSPARSE_OPERATION_NON_TRANSPOSE, &one, mat,
                                md, &zero, mp, CUDA_R_64F,
                                CUSPARSE_SPMM_CSR_ALG1, &spmm_bytes));
    void *spmm_buffer = nullptr;
    CK(cudaMalloc(&spmm_buffer, spmm_bytes > 0 ? spmm_bytes : 1));
    CKS(cusparseSpMM(sp, CUSPARSE_OPERATION_NON_TRANSPOSE,
                     CUSPARSE_OPERATION_NON_TRANSPOSE, &one, mat, md, &zero,
                     mp, CUDA_R_64F, CUSPARSE_SPMM_CSR_ALG1, spmm_buffer));
    CK(cudaMemcpyAsync(product.data(), d_product,
                       product.size() * sizeof(double),
                       cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    double sum = 0.0;
    for (size_t i = 0; i < product.size(); i++) {
        if (product[i] != expect[i]) // small integers: exact
            fail("SpMM [%zu] = %g, expected %g", i, product[i], expect[i]);
        sum += product[i];
    }
    printf("SpMM %d x %d: exact, sum %.1f\n", n, k, sum);

    // Sparse to dense: the first 16 rows only are compared (n x n doubles
    // would be 128 MiB).
    const int rows16 = 16;
    cusparseSpMatDescr_t top;
    CKS(cusparseCreateCsr(&top, rows16, n, a.rows[rows16], d_rows, d_cols,
                          d_vals, CUSPARSE_INDEX_32I, CUSPARSE_INDEX_32I,
                          CUSPARSE_INDEX_BASE_ZERO, CUDA_R_64F));
    double *d_full;
    CK(cudaMalloc(&d_full, (size_t)rows16 * n * sizeof(double)));
    cusparseDnMatDescr_t full;
    CKS(cusparseCreateDnMat(&full, rows16, n, n, d_full, CUDA_R_64F,
                            CUSPARSE_ORDER_ROW));
    size_t s2d_bytes = 0;
    CKS(cusparseSparseToDense_bufferSize(
        sp, top, full, CUSPARSE_SPARSETODENSE_ALG_DEFAULT, &s2d_bytes));
    void *s2d_buffer = nullptr;
    CK(cudaMalloc(&s2d_buffer, s2d_bytes > 0 ? s2d_bytes : 1));
    CKS(cusparseSparseToDense(sp, top, full,
                              CUSPARSE_SPARSETODENSE_ALG_DEFAULT, s2d_buffer));
    std::vector<double> h_full((size_t)rows16 * n);
    CK(cudaMemcpyAsync(h_full.data(), d_full, h_full.size() * sizeof(double),
                       cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    int nonzero = 0;
    for (int r = 0; r < rows16; r++)
        for (int c = 0; c < n; c++) {
            double v = 0.0;
            for (int q = a.rows[r]; q < a.rows[r + 1]; q++)
                if (a.cols[q] == c) v = a.vals[q];
            if (h_full[(size_t)r * n + c] != v)
                fail("dense[%d][%d] = %g, expected %g", r, c,
                     h_full[(size_t)r * n + c], v);
            nonzero += v != 0.0;
        }
    printf("sparse to dense: %d rows exact, %d nonzeros\n", rows16, nonzero);

    CKS(cusparseDestroySpMat(top));
    CKS(cusparseDestroyDnMat(full));
    CKS(cusparseDestroyDnMat(md));
    CKS(cusparseDestroyDnMat(mp));
    CKS(cusparseDestroyDnVec(vp));
    CKS(cusparseDestroyDnVec(vap));
    CKS(cusparseDestroySpMat(mat));
    for (void *p : {(void *)d_rows, (void *)d_cols, (void *)d_vals,
                    (void *)d_x, (void *)d_r, (void *)d_p, (void *)d_ap,
                    buffer, (void *)d_dense, (void *)d_product, spmm_buffer,
                    (void *)d_full, s2d_buffer})
        CK(cudaFree(p));
    CKS(cusparseDestroy(sp));
    CKB(cublasDestroy(bl));
    CK(cudaStreamDestroy(stream));
    printf("PASS " NAME "\n");
    return 0;
}
