# C declarations the fast path needs from libc and the kernel headers.
# Logic lives in the .pyx files; this file only names what C already has.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int sendmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *vec, unsigned int vlen, int flags, void *timeout)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const void *addr,
                   socklen_t addrlen)

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC


cdef extern from "<netinet/udp.h>" nogil:
    enum:
        SOL_UDP
        UDP_SEGMENT     # send: one buffer of equal-sized datagrams (GSO)
        UDP_GRO         # receive: many datagrams of one peer in one buffer


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct sockaddr_in:
        unsigned short sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct in6_addr:
        uint8_t s6_addr[16]

    # Room for either family's address: the loops' message names are these.
    struct sockaddr_in6:
        unsigned short sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    uint16_t htons(uint16_t)
    uint32_t htonl(uint32_t)


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents

    int poll(pollfd *fds, unsigned long nfds, int timeout)

    enum:
        POLLIN


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)

    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK


# The table and the counters are written by one thread and read by another. GCC's __atomic
# builtins give single-instruction relaxed loads and stores on 64-bit words: no lock, no tearing.
cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t pf_load(const uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline void pf_store(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    /* An entry that points into other memory (an outer IPv6 peer's address) is published
       after that memory is written. */
    static inline void pf_store_release(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    /* Counters have a single writer, so load + store is an exact increment. */
    static inline void pf_add(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
    }
    """
    uint64_t pf_load(const uint64_t *p) nogil
    void pf_store(uint64_t *p, uint64_t v) nogil
    void pf_store_release(uint64_t *p, uint64_t v) nogil
    void pf_add(uint64_t *p, uint64_t v) nogil


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    pthread_t pthread_self()
    # Names the calling thread for top -H, perf and /proc/PID/task/*/comm (15 bytes at most).
    int pthread_setname_np(pthread_t thread, const char *name)
