# The system calls and atomics the compiled code uses, declared once, all callable without the
# GIL.

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN
        EIO
        ENOSPC
        EINVAL
        EPIPE
        ECONNRESET
        EOPNOTSUPP
        ENOSYS
        ENOTSUP
        EBADF
        ENXIO
        ETIMEDOUT
        EPERM
        EFBIG
        EDQUOT
        EROFS
        ENOMEM
        EPROTO
        EFAULT

cdef extern from "<string.h>" nogil:
    void *memcpy(void *dst, const void *src, size_t n)
    void *memset(void *dst, int c, size_t n)
    void *memmove(void *dst, const void *src, size_t n)
    int memcmp(const void *a, const void *b, size_t n)
    int strcmp(const char *a, const char *b)
    size_t strlen(const char *s)

cdef extern from "<stdlib.h>" nogil:
    void *malloc(size_t n)
    void *calloc(size_t n, size_t m)
    void *realloc(void *p, size_t n)
    void free(void *p)
    void abort()
    void qsort(void *base, size_t n, size_t size,
               int (*compar)(const void *, const void *) noexcept nogil)

cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t
    ctypedef long off_t

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)
    ssize_t pread(int fd, void *buf, size_t n, off_t offset)
    ssize_t pwrite(int fd, const void *buf, size_t n, off_t offset)
    int fdatasync(int fd)
    int close(int fd)
    off_t lseek(int fd, off_t offset, int whence)
    int usleep(unsigned int usec)
    long sysconf(int name)
    enum:
        SEEK_SET
        SEEK_DATA
        SEEK_HOLE
        _SC_NPROCESSORS_ONLN

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t pwritev2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    enum:
        RWF_DSYNC

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int posix_fadvise(int fd, off_t offset, off_t length, int advice)
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
    ssize_t splice(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t n,
                   unsigned int flags)
    int pipe2(int fds[2], int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SYNC_FILE_RANGE_WRITE
        POSIX_FADV_WILLNEED
        POSIX_FADV_SEQUENTIAL
        SPLICE_F_MOVE
        SPLICE_F_MORE
        F_SETPIPE_SZ
        F_GETFL
        F_SETFL
        O_CLOEXEC
        O_NONBLOCK

cdef extern from "<linux/falloc.h>" nogil:
    enum:
        FALLOC_FL_KEEP_SIZE
        FALLOC_FL_PUNCH_HOLE
        FALLOC_FL_ZERO_RANGE

cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t n, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t n)
    enum:
        PROT_READ
        MAP_SHARED
    void *MAP_FAILED

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int name, void *value, unsigned int *length)
    enum:
        SO_INCOMING_CPU
        MSG_NOSIGNAL
        MSG_MORE
        MSG_WAITALL
        MSG_DONTWAIT
        SOL_SOCKET
        SHUT_RDWR
        SHUT_RD

cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    int sched_getaffinity(int pid, size_t size, cpu_set_t *mask)
    int sched_setaffinity(int pid, size_t size, const cpu_set_t *mask)
    void CPU_ZERO(cpu_set_t *mask)
    void CPU_SET(int cpu, cpu_set_t *mask)
    int CPU_ISSET(int cpu, const cpu_set_t *mask)
    enum:
        CPU_SETSIZE

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec *ts)
    enum:
        CLOCK_MONOTONIC


cdef inline int64_t now_ns() noexcept nogil:
    """The monotonic clock in nanoseconds."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t x)
    uint32_t htobe32(uint32_t x)
    uint64_t htobe64(uint64_t x)
    uint16_t be16toh(uint16_t x)
    uint32_t be32toh(uint32_t x)
    uint64_t be64toh(uint64_t x)

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<linux/fs.h>" nogil:
    enum:
        FS_IOC_FIEMAP

cdef extern from "<linux/fiemap.h>" nogil:
    struct fiemap_extent:
        uint64_t fe_logical
        uint64_t fe_physical
        uint64_t fe_length
        uint32_t fe_flags
    struct fiemap:
        uint64_t fm_start
        uint64_t fm_length
        uint32_t fm_flags
        uint32_t fm_mapped_extents
        uint32_t fm_extent_count
        fiemap_extent fm_extents[1]
    enum:
        FIEMAP_FLAG_SYNC
        FIEMAP_EXTENT_LAST
        FIEMAP_EXTENT_UNWRITTEN
    const uint64_t FIEMAP_MAX_OFFSET

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    ctypedef struct pthread_rwlockattr_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *lock, const pthread_rwlockattr_t *attr)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)
    int pthread_rwlock_rdlock(pthread_rwlock_t *lock)
    int pthread_rwlock_wrlock(pthread_rwlock_t *lock)
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)
    int pthread_rwlockattr_init(pthread_rwlockattr_t *attr)
    int pthread_rwlockattr_setkind_np(pthread_rwlockattr_t *attr, int pref)
    enum:
        PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP

cdef extern from *:
    """
    #include <errno.h>
    static inline void flexnbd_set_errno(int e) { errno = e; }
    """
    void set_errno "flexnbd_set_errno"(int e) nogil


# --------------------------------------------------------------------------------------------
# Atomics (GCC builtins): flags and pointers shared between threads, and the bitmaps' words.

cdef extern from *:
    """
    static inline int flexnbd_load_acquire(const int *p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void flexnbd_store_release(int *p, int v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int flexnbd_add(int *p, int v)
    { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
    static inline void *flexnbd_load_ptr(void **p)
    { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void flexnbd_store_ptr(void **p, void *v)
    { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    static inline int flexnbd_cas_ptr(void **p, void *expected, void *v)
    { return __atomic_compare_exchange_n(p, &expected, v, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE); }
    static inline void flexnbd_or64(unsigned long long *p, unsigned long long v)
    { __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
    static inline void flexnbd_and64(unsigned long long *p, unsigned long long v)
    { __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
    static inline unsigned long long flexnbd_load64(const unsigned long long *p)
    { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void flexnbd_store64(unsigned long long *p, unsigned long long v)
    { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline unsigned long long flexnbd_xchg64(unsigned long long *p, unsigned long long v)
    { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
    """
    int load_acquire "flexnbd_load_acquire"(const int *p) nogil
    void store_release "flexnbd_store_release"(int *p, int v) nogil
    int atomic_add "flexnbd_add"(int *p, int v) nogil
    void *load_ptr "flexnbd_load_ptr"(void **p) nogil
    void store_ptr "flexnbd_store_ptr"(void **p, void *v) nogil
    # Install v at *p if *p is still ``expected``: 1 if it did.
    int cas_ptr "flexnbd_cas_ptr"(void **p, void *expected, void *v) nogil
    void atomic_or64 "flexnbd_or64"(unsigned long long *p, unsigned long long v) nogil
    void atomic_and64 "flexnbd_and64"(unsigned long long *p, unsigned long long v) nogil
    unsigned long long atomic_load64 "flexnbd_load64"(const unsigned long long *p) nogil
    # (a counter one thread writes and others read: a plain store, never torn)
    void atomic_store64 "flexnbd_store64"(unsigned long long *p, unsigned long long v) nogil
    unsigned long long atomic_xchg64 "flexnbd_xchg64"(unsigned long long *p,
                                                      unsigned long long v) nogil
    int popcount64 "__builtin_popcountll"(unsigned long long v) nogil
