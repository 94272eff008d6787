/* Diagnostic: logs how NVIDIA's driver answers the slots of private export
 * tables during a native run, to learn what gpupool's libcuda must answer.
 *
 * An LD_PRELOAD library. Its constructor asks the real driver for each table
 * named in PROBE_TABLES (UUIDs as 32 hex digits, comma-separated, at most 2)
 * and replaces every function slot with a wrapper that calls the driver's
 * function and logs the arguments, the words they point to before and after
 * the call (and the text a changed word points to, when it is a string),
 * the calling library and offset, and the return value (the first 6 calls of
 * each slot). PROBE_CALLBACK_SLOTS ("table:slot:arg,...", e.g. 6e163fbe:7:2)
 * names function-pointer arguments to wrap as well: each call of such a
 * callback is logged with its arguments, result and cuFuncGetName of its
 * second argument. cuGetProcAddress is left alone: the runtime checks its
 * address.
 *
 * Build: gcc -shared -fPIC -O1 -o export-table-probe.so export-table-probe.c -ldl
 * Run:   PROBE_TABLES=42d85a8123f6cb478298f6e78a3aecdc \
 *        LD_PRELOAD=./export-table-probe.so ./program 2>probe.log
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

typedef int CUresult_t;

#define TABLES 2
#define SLOTS 128
typedef uintptr_t (*slot_fn)(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);
static slot_fn original[TABLES][SLOTS];
static int calls[TABLES][SLOTS];
static char names[TABLES][33];

/* Reads one word at p without faulting; 0 on failure. */
static int peek(uintptr_t p, uintptr_t *out) {
    if (p < 0x10000 || (p & 7)) return 0;
    struct iovec local = {out, sizeof *out}, remote = {(void *)p, sizeof *out};
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == sizeof *out;
}

/* Prints the text at p when it is a short printable C string. */
static void show_string(const char *label, uintptr_t p) {
    char buf[97] = {0};
    struct iovec local = {buf, 96}, remote = {(void *)p, 96};
    if (p < 0x10000 || process_vm_readv(getpid(), &local, 1, &remote, 1, 0) <= 0) return;
    int n = 0;
    while (n < 96 && buf[n] >= 0x20 && buf[n] < 0x7f) n++;
    if (n >= 4 && (n == 96 || buf[n] == 0)) fprintf(stderr, " %s=\"%.*s\"", label, n, buf);
}

/* The callback a slot was given (PROBE_CALLBACK_SLOTS), wrapped to log. */
typedef uintptr_t (*callback_fn)(uintptr_t, uintptr_t, uintptr_t, uintptr_t);
static __thread callback_fn inner_callback;
static uintptr_t logged_callback(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d) {
    uintptr_t r = inner_callback(a, b, c, d);
    fprintf(stderr, "PROBE   callback(%#lx, %#lx, %#lx, %#lx) -> %#lx", (unsigned long)a, (unsigned long)b,
            (unsigned long)c, (unsigned long)d, (unsigned long)r);
    static CUresult_t (*get_name)(const char **, uintptr_t);
    if (!get_name) get_name = (CUresult_t (*)(const char **, uintptr_t))dlsym(RTLD_DEFAULT, "cuFuncGetName");
    const char *name = NULL;
    if (get_name && get_name(&name, b) == 0 && name) fprintf(stderr, " cuFuncGetName(b)=%s", name);
    fputc('\n', stderr);
    return r;
}

static uintptr_t logged(int t, int s, uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t e, uintptr_t f) {
    uintptr_t args[6] = {a, b, c, d, e, f}, before[6] = {0}, after[6] = {0};
    int ok[6];
    for (int i = 0; i < 6; i++) ok[i] = peek(args[i], &before[i]);
    Dl_info caller;
    void *ret = __builtin_return_address(0);
    const char *cb_slots = getenv("PROBE_CALLBACK_SLOTS"); /* "table:slot:arg,..." e.g. 6e163fbe:7:2 */
    int wrapped = -1;
    char key[32];
    for (int i = 0; i < 6 && cb_slots; i++) {
        snprintf(key, sizeof key, "%.8s:%d:%d", names[t], s, i);
        if (strstr(cb_slots, key)) {
            inner_callback = (callback_fn)args[i];
            args[i] = (uintptr_t)logged_callback;
            wrapped = i;
        }
    }
    uintptr_t r = original[t][s](args[0], args[1], args[2], args[3], args[4], args[5]);
    if (wrapped >= 0) args[wrapped] = (uintptr_t)inner_callback;
    int n = __atomic_add_fetch(&calls[t][s], 1, __ATOMIC_RELAXED);
    if (n <= 6) {
        fprintf(stderr, "PROBE %s[%d] call %d -> %#lx", names[t], s, n, (unsigned long)r);
        if (dladdr(ret, &caller) && caller.dli_fname)
            fprintf(stderr, " from %s+%#lx", caller.dli_fname, (unsigned long)((uintptr_t)ret - (uintptr_t)caller.dli_fbase));
        for (int i = 0; i < 6; i++) {
            if (ok[i] && peek(args[i], &after[i])) {
                fprintf(stderr, " | a%d %#lx (*%#lx -> *%#lx)", i, (unsigned long)args[i],
                        (unsigned long)before[i], (unsigned long)after[i]);
                if (after[i] != before[i]) show_string("str", after[i]);
            } else {
                fprintf(stderr, " | a%d %#lx", i, (unsigned long)args[i]);
            }
        }
        fputc('\n', stderr);
    }
    return r;
}

#define WRAP(t, s) \
    static uintptr_t w_##t##_##s(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t e, uintptr_t f) { \
        return logged(t, s, a, b, c, d, e, f); \
    }
#define REP8(M, t, b) M(t, b##0) M(t, b##1) M(t, b##2) M(t, b##3) M(t, b##4) M(t, b##5) M(t, b##6) M(t, b##7)
/* Slot numbers in octal digits keep the token pasting simple: 0..0177. */
#define REP128(M, t) REP8(M, t, 0) REP8(M, t, 01) REP8(M, t, 02) REP8(M, t, 03) REP8(M, t, 04) REP8(M, t, 05) \
    REP8(M, t, 06) REP8(M, t, 07) REP8(M, t, 010) REP8(M, t, 011) REP8(M, t, 012) REP8(M, t, 013) \
    REP8(M, t, 014) REP8(M, t, 015) REP8(M, t, 016) REP8(M, t, 017)
REP128(WRAP, 0)
REP128(WRAP, 1)
#define ENTRY(t, s) w_##t##_##s,
static slot_fn wrappers[TABLES][SLOTS] = {{REP128(ENTRY, 0)}, {REP128(ENTRY, 1)}};

static void patch(int t, const char *hex, int (*get)(const void **, const void *)) {
    unsigned char uuid[16];
    for (int i = 0; i < 16; i++) sscanf(hex + 2 * i, "%2hhx", &uuid[i]);
    snprintf(names[t], sizeof names[t], "%.8s", hex);
    const void *table = NULL;
    int rc = get(&table, uuid);
    if (rc != 0 || !table) { fprintf(stderr, "PROBE %s: cuGetExportTable -> %d\n", names[t], rc); return; }
    uintptr_t *slots = (uintptr_t *)table;
    size_t n = slots[0] < 0x1000 ? slots[0] / sizeof(uintptr_t) : 0; /* size word, when there is one */
    if (n == 0 || n > SLOTS) n = SLOTS > 64 ? 64 : SLOTS;
    fprintf(stderr, "PROBE %s: table %p, word0 %#lx, patching %zu slots\n", names[t], table, (unsigned long)slots[0], n);
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)slots & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, ((uintptr_t)(slots + n) - start + page - 1) / page * page, PROT_READ | PROT_WRITE) != 0) {
        perror("PROBE mprotect");
        return;
    }
    for (size_t s = 1; s < n; s++) {
        original[t][s] = (slot_fn)slots[s];
        if (original[t][s]) slots[s] = (uintptr_t)wrappers[t][s];
    }
}

__attribute__((constructor)) static void probe_init(void) {
    const char *list = getenv("PROBE_TABLES");
    if (!list) return;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) { fprintf(stderr, "PROBE: %s\n", dlerror()); return; }
    int (*get)(const void **, const void *) = (int (*)(const void **, const void *))dlsym(lib, "cuGetExportTable");
    if (!get) return;
    for (int t = 0; t < TABLES && strlen(list) >= 32; t++) {
        patch(t, list, get);
        list += 32;
        if (*list == ',') list++;
    }
}
