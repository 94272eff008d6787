// cutrace: a tracing libcuda.so.1 for diagnosing programs, natively and
// through gpupool's drop-in library alike. It sits in front of a real driver
// library (linked as libcutrace_real.so: a symlink to the system libcuda or
// to gpupool's stub) and hands out, for every entry point the CUDA runtime
// resolves through cuGetProcAddress, a trampoline that logs the call's
// result ("name = code", nesting shown by indentation) and then returns to
// the caller. Every other exported symbol resolves to the real library
// through this one's dependency. x86-64 Linux only.
//
// Env: CUTRACE_FILE  where the lines go (default stderr).
// Build and use: bench/cutrace/build.sh; bench/dropin.sh with CUTRACE=1.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SLOTS 2048
#define DEPTH 64

typedef int (*proc_v2_fn)(const char *, void **, int, uint64_t, int *);
typedef int (*proc_v1_fn)(const char *, void **, int, uint64_t);

static const char *names[SLOTS];
void *cutrace_real[SLOTS]; // read by the trampolines
static int used;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *out;
static proc_v2_fn real_v2;
static proc_v1_fn real_v1;

static __thread struct {
    int slot;
    void *ret;
} stack[DEPTH];
static __thread int depth;

extern char cutrace_slots[]; // SLOTS trampolines of 16 bytes each

static void init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    void setup(void);
    pthread_once(&once, setup);
}

void setup(void) {
    const char *path = getenv("CUTRACE_FILE");
    out = path ? fopen(path, "a") : NULL;
    if (!out) out = stderr;
    setvbuf(out, NULL, _IOLBF, 0);
    void *real = dlopen("libcutrace_real.so", RTLD_LAZY | RTLD_NOLOAD);
    if (!real) {
        fprintf(stderr, "cutrace: libcutrace_real.so is not loaded: %s\n", dlerror());
        abort();
    }
    real_v2 = (proc_v2_fn)dlsym(real, "cuGetProcAddress_v2");
    real_v1 = (proc_v1_fn)dlsym(real, "cuGetProcAddress");
    fprintf(out, "cutrace: tracing pid %d\n", (int)getpid());
}

// Called by a trampoline on entry: remembers where to return, gives the
// real function.
void *cutrace_enter(int slot, void *ret) {
    if (depth >= DEPTH) {
        fprintf(stderr, "cutrace: calls nested deeper than %d\n", DEPTH);
        abort();
    }
    stack[depth].slot = slot;
    stack[depth].ret = ret;
    depth++;
    return cutrace_real[slot];
}

// Called by a trampoline when the real function returned `rc`.
void *cutrace_exit(int rc) {
    depth--;
    int slot = stack[depth].slot;
    fprintf(out, "%*s%s = %d\n", 2 * depth, "", names[slot], rc);
    return stack[depth].ret;
}

// The trampoline for `fn`, named `name`: one per distinct real function.
static void *wrap(const char *name, void *fn) {
    pthread_mutex_lock(&lock);
    void *slot = fn;
    int i;
    for (i = 0; i < used && cutrace_real[i] != fn; i++) {
    }
    if (i == used && used < SLOTS) {
        names[i] = strdup(name);
        cutrace_real[i] = fn;
        used++;
    }
    if (i < used) slot = cutrace_slots + 16 * i;
    pthread_mutex_unlock(&lock);
    return slot;
}

int cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status);

static int hook(const char *symbol, void **pfn, int rc) {
    if (rc == 0 && pfn && *pfn) {
        if (strcmp(symbol, "cuGetProcAddress") == 0) {
            *pfn = (void *)cuGetProcAddress_v2;
        } else {
            *pfn = wrap(symbol, *pfn);
        }
    }
    fprintf(out, "resolve %s = %d\n", symbol, rc);
    return rc;
}

int cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags, int *status) {
    init();
    return hook(symbol, pfn, real_v2(symbol, pfn, version, flags, status));
}

int cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
    init();
    return hook(symbol, pfn, real_v1(symbol, pfn, version, flags));
}

// Trampoline i: r11 = i, then the common part, which saves the argument
// registers (integer and vector), calls cutrace_enter, drops the caller's
// return address (kept in thread-local storage) so that arguments on the
// stack stay where the callee expects them, calls the real function, logs
// its result and jumps back to the caller.
__asm__(
    ".text\n"
    ".globl cutrace_slots\n"
    ".hidden cutrace_slots\n"
    ".p2align 4\n"
    "cutrace_slots:\n"
    ".set i, 0\n"
    ".rept 2048\n"
    "  movl $i, %r11d\n"          // 6 bytes
    "  jmp cutrace_common\n"       // 5 bytes (rel32)
    "  .p2align 4\n"
    "  .set i, i+1\n"
    ".endr\n"
    "cutrace_common:\n"
    "  push %rdi\n push %rsi\n push %rdx\n push %rcx\n push %r8\n push %r9\n"
    "  sub $136, %rsp\n"
    "  movdqu %xmm0, 0(%rsp)\n movdqu %xmm1, 16(%rsp)\n movdqu %xmm2, 32(%rsp)\n"
    "  movdqu %xmm3, 48(%rsp)\n movdqu %xmm4, 64(%rsp)\n movdqu %xmm5, 80(%rsp)\n"
    "  movdqu %xmm6, 96(%rsp)\n movdqu %xmm7, 112(%rsp)\n"
    "  mov %r11d, %edi\n"
    "  mov 184(%rsp), %rsi\n"
    "  call cutrace_enter\n"
    "  mov %rax, %r11\n"
    "  movdqu 0(%rsp), %xmm0\n movdqu 16(%rsp), %xmm1\n movdqu 32(%rsp), %xmm2\n"
    "  movdqu 48(%rsp), %xmm3\n movdqu 64(%rsp), %xmm4\n movdqu 80(%rsp), %xmm5\n"
    "  movdqu 96(%rsp), %xmm6\n movdqu 112(%rsp), %xmm7\n"
    "  add $136, %rsp\n"
    "  pop %r9\n pop %r8\n pop %rcx\n pop %rdx\n pop %rsi\n pop %rdi\n"
    "  add $8, %rsp\n"
    "  call *%r11\n"
    "  push %rax\n"
    "  sub $8, %rsp\n"
    "  mov %eax, %edi\n"
    "  call cutrace_exit\n"
    "  mov %rax, %r11\n"
    "  add $8, %rsp\n"
    "  pop %rax\n"
    "  jmp *%r11\n");
