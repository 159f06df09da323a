/* LD_PRELOAD shim for Debian's user-mode-linux 6.1 (tests/uml.py) on hosts whose XSAVE area is
 * larger than the guest kernel's buffer for it (AMX: 11 KB). The host kernel only accepts
 * PTRACE_SETREGSET NT_X86_XSTATE with the whole area (EFAULT otherwise: the guest's init dies with
 * "ptrace set fp regs failed, errno = 14"). Here a get reads the whole area and hands back what
 * fits the caller's buffer; a set reads the whole area, lays the caller's bytes over its start
 * and writes it all back, so the components past the guest's buffer (AMX tile state, which no
 * guest process can enable) keep their value. Other requests pass through. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif

static char whole[64 * 1024] __attribute__((aligned(64)));

long ptrace(enum __ptrace_request request, ...)
{
    static long (*real)(enum __ptrace_request, pid_t, void *, void *);
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (long (*)(enum __ptrace_request, pid_t, void *, void *))dlsym(RTLD_NEXT, "ptrace");
    if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) && (long)addr == NT_X86_XSTATE && data) {
        struct iovec *iov = data;
        struct iovec all = {whole, sizeof whole};
        if (real(PTRACE_GETREGSET, pid, addr, &all) == 0 && all.iov_len > iov->iov_len) {
            if (request == PTRACE_GETREGSET) {
                memcpy(iov->iov_base, whole, iov->iov_len);
                return 0;
            }
            memcpy(whole, iov->iov_base, iov->iov_len);
            return real(PTRACE_SETREGSET, pid, addr, &all);
        }
    }
    return real(request, pid, addr, data);
}
