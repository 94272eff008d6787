/*
 * ipc_events: a CUDA event shared between two processes (IPC), no kernels
 * (a CI program).
 *
 * The program forks before cuInit (CUDA's rule: a process that initialized
 * CUDA cannot use it after a fork). The parent creates an INTERPROCESS
 * event, records it after a memset on its stream and passes the handle to
 * the child through a pipe; the child opens it, makes a stream of its own
 * wait for it, records it again and synchronizes, then tells the parent,
 * which synchronizes the event and checks its memory. Through gpupool the
 * two processes are two sessions of one tenant on one server
 * (docs/ipc.md).
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#define NAME "ipc_events"

#include "check_driver.h"

enum { WORDS = 1 << 16 };

static void put_all(int fd, const void *p, size_t n)
{
    if (write(fd, p, n) != (ssize_t)n)
        fail("writing to the pipe");
}

static void get_all(int fd, void *p, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)p + got, n - got);
        if (r <= 0)
            fail("reading from the pipe");
        got += (size_t)r;
    }
}

static int child(int from_parent, int to_parent)
{
    CUipcEventHandle h;
    CUevent ev;
    CUstream s;
    primary_context();
    get_all(from_parent, &h, sizeof h);
    CK(cuIpcOpenEventHandle(&ev, h));
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CK(cuStreamWaitEvent(s, ev, 0));
    CK(cuStreamSynchronize(s));
    CK(cuEventRecord(ev, s));
    CK(cuEventSynchronize(ev));
    CK(cuEventQuery(ev));
    CK(cuEventDestroy(ev));
    CK(cuStreamDestroy(s));
    printf("child: opened, waited for and recorded the parent's event\n");
    fflush(stdout);
    put_all(to_parent, "k", 1);
    return 0;
}

int main(void)
{
    int down[2], up[2];
    if (pipe(down) != 0 || pipe(up) != 0)
        fail("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0)
        fail("fork");
    if (pid == 0)
        return child(down[0], up[1]);

    CUdevice dev;
    CUevent plain, ev;
    CUstream s;
    CUdeviceptr buf;
    CUipcEventHandle h;
    int supported = 0;
    primary_context();
    CK(cuDeviceGet(&dev, 0));
    CK(cuDeviceGetAttribute(&supported, CU_DEVICE_ATTRIBUTE_IPC_EVENT_SUPPORTED, dev));
    printf("IPC events supported: %d\n", supported);

    CK(cuEventCreate(&plain, CU_EVENT_DISABLE_TIMING));
    CUresult r = cuIpcGetEventHandle(&h, plain);
    printf("handle of an event without INTERPROCESS -> %s\n", err_name(r));
    CK(cuEventDestroy(plain));

    CK(cuEventCreate(&ev, CU_EVENT_INTERPROCESS | CU_EVENT_DISABLE_TIMING));
    CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
    CK(cuMemAlloc(&buf, WORDS * sizeof(unsigned)));
    CK(cuMemsetD32Async(buf, 0x5eed, WORDS, s));
    CK(cuEventRecord(ev, s));
    CK(cuIpcGetEventHandle(&h, ev));
    fflush(stdout);
    put_all(down[1], &h, sizeof h);

    char done;
    get_all(up[0], &done, 1);
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("the child failed (status %d)", status);
    CK(cuEventSynchronize(ev));
    static unsigned host[WORDS];
    CK(cuMemcpyDtoH(host, buf, sizeof host));
    for (int i = 0; i < WORDS; i++)
        if (host[i] != 0x5eed)
            fail("word %d is %#x", i, host[i]);
    printf("parent: event complete, memory ok\n");
    CK(cuMemFree(buf));
    CK(cuStreamDestroy(s));
    CK(cuEventDestroy(ev));
    printf("PASS " NAME "\n");
    return 0;
}
