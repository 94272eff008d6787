// check_cublas.h: CKB, check.h's CK for cuBLAS calls. A program includes
// check.h (with NAME defined) first, then this; a failing call prints
// `FAIL <name>: line N: <call> -> <status name> (<status>)` and exits 1.
#pragma once

#include <cublas_v2.h>

#ifndef NAME
#error "include check.h before check_cublas.h"
#endif

#define CKB(call) CK_STATUS(call, cublasStatus_t, CUBLAS_STATUS_SUCCESS, cublasGetStatusName)
