/* FUSE over io_uring for the Cython session (_session_c.pyx): the rings, their entries, and the
 * two commands of the protocol (linux/fuse.h 7.42; Debian 12's header is 7.38, so the structures
 * are spelled out here). liburing sets up the ring and fills its queues; the commands are filled
 * by hand (liburing 2.3 has no helper for IORING_OP_URING_CMD).
 *
 * One ring serves every queue: the kernel keeps a queue of entries per possible CPU and hands a
 * request to an entry of the requester's CPU; the entry's completion arrives on the ring that
 * submitted its last command. Only the thread that owns the ring (see the session) touches its
 * submission and completion queues; a reply made on another thread goes through `pending` and
 * the eventfd, which wakes the owner.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <poll.h>
#include <liburing.h>

#define UF_OVER_IO_URING (1ULL << 41)
#define UF_URING_CMD_REGISTER 1
#define UF_URING_CMD_COMMIT_AND_FETCH 2
#define UF_IN_HEADER 40             /* sizeof(struct fuse_in_header) */
#define UF_OP_IN 128                /* FUSE_URING_OP_IN_OUT_SZ */
#define UF_EFD_TAG 1                /* user_data of the eventfd's poll (entries are pointers) */

struct uf_ring_ent_in_out { uint64_t flags, commit_id; uint32_t payload_sz, padding; uint64_t reserved; };
struct uf_ring_req_header {
    char in_out[128];               /* fuse_in_header from the kernel, fuse_out_header to it */
    char op_in[UF_OP_IN];           /* the request's first argument (its fuse_*_in) */
    struct uf_ring_ent_in_out ent;
};
struct uf_ring_cmd_req { uint64_t flags, commit_id; uint16_t qid; uint8_t padding[6]; };
struct uf_out_header { uint32_t len; int32_t error; uint64_t unique; };

/* One entry: a page for the header (and for the request made contiguous again, see
 * uf_ent_request), then the payload buffer. */
struct uf_ent {
    struct uf_ring_req_header *hdr;
    char *payload;
    struct iovec iov[2];
    uint64_t unique;                /* the request it holds, its commit id */
    uint16_t qid;
};

struct uf_ring {
    struct io_uring ring;
    int ready;                      /* ring set up (io_uring_queue_init succeeded) */
    int efd;
    int nents;
    size_t payload_size, map_size;
    struct uf_ent *ents;
    struct uf_ent **pending;        /* replies made off the owner thread, not yet committed */
    int npending;
    uint64_t served;                /* requests that came through the ring */
};

/* The request the running thread serves from an entry, and whether it owns the ring. */
static __thread struct uf_ent *uf_cur;
static __thread int uf_owner;

static void uf_ring_free(struct uf_ring *r)
{
    if (r->ready)
        io_uring_queue_exit(&r->ring);
    for (int i = 0; r->ents && i < r->nents; i++)
        if (r->ents[i].hdr)
            munmap(r->ents[i].hdr, r->map_size);
    free(r->ents);
    free(r->pending);
    if (r->efd >= 0)
        close(r->efd);
    memset(r, 0, sizeof(*r));
    r->efd = -1;
}

/* Set up the ring and `nqueues * depth` entries with payload buffers of `payload_size` bytes.
 * 0, or -errno (the ring is then freed). */
static int uf_ring_setup(struct uf_ring *r, int fuse_fd, int nqueues, int depth, size_t payload_size)
{
    struct io_uring_params p;
    long page = sysconf(_SC_PAGESIZE);
    int err;
    memset(r, 0, sizeof(*r));
    r->efd = -1;
    r->nents = nqueues * depth;
    r->payload_size = (payload_size + page - 1) / page * page;
    r->map_size = page + r->payload_size;
    memset(&p, 0, sizeof(p));
    /* SQE128: the command's 80 bytes; a completion queue that cannot overflow. */
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = 2 * (r->nents + 1);
    err = io_uring_queue_init_params(r->nents + 1, &r->ring, &p);
    if (err < 0)
        return err;
    r->ready = 1;
    /* The /dev/fuse fd as a registered file: no file lookup per command. */
    err = io_uring_register_files(&r->ring, &fuse_fd, 1);
    if (err < 0)
        goto fail;
    r->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->ents = calloc(r->nents, sizeof(struct uf_ent));
    r->pending = calloc(r->nents, sizeof(struct uf_ent *));
    if (r->efd < 0 || !r->ents || !r->pending) {
        err = r->efd < 0 ? -errno : -ENOMEM;
        goto fail;
    }
    for (int i = 0; i < r->nents; i++) {
        struct uf_ent *e = &r->ents[i];
        /* Mapped, not allocated: pages are only backed once a request uses them. */
        void *m = mmap(NULL, r->map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            err = -errno;
            goto fail;
        }
        e->hdr = m;
        e->payload = (char *)m + page;
        e->qid = i / depth;
        e->iov[0].iov_base = e->hdr;
        e->iov[0].iov_len = sizeof(struct uf_ring_req_header);
        e->iov[1].iov_base = e->payload;
        e->iov[1].iov_len = r->payload_size;
    }
    return 0;
fail:
    uf_ring_free(r);
    return err;
}

/* A command for the entry in the next submission queue entry (the owner's; never full: there
 * is one entry per fuse entry and one for the eventfd). */
static void uf_ring_prep(struct uf_ring *r, struct uf_ent *e, uint32_t cmd_op)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    struct uf_ring_cmd_req *req;
    if (!sqe)
        abort();    /* cannot be: one queue entry per fuse entry, each in at most once */
    memset((char *)sqe, 0, 2 * sizeof(*sqe));     /* SQE128 */
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->flags = IOSQE_FIXED_FILE;
    sqe->fd = 0;
    sqe->cmd_op = cmd_op;
    io_uring_sqe_set_data(sqe, e);
    req = (struct uf_ring_cmd_req *)sqe->cmd;
    req->qid = e->qid;
    if (cmd_op == UF_URING_CMD_REGISTER) {
        sqe->addr = (uint64_t)(uintptr_t)e->iov;
        sqe->len = 2;
    } else {
        req->commit_id = e->unique;
    }
}

static void uf_ring_poll_efd(struct uf_ring *r)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe)
        abort();
    io_uring_prep_poll_add(sqe, r->efd, POLLIN);
    io_uring_sqe_set_data64(sqe, UF_EFD_TAG);
}

/* Every entry's REGISTER, and the eventfd's poll; submitted by the first owner. */
static void uf_ring_register_all(struct uf_ring *r)
{
    for (int i = 0; i < r->nents; i++)
        uf_ring_prep(r, &r->ents[i], UF_URING_CMD_REGISTER);
    uf_ring_poll_efd(r);
}

/* The eventfd fired: reset it and poll again. */
static void uf_ring_rearm(struct uf_ring *r)
{
    uint64_t v;
    if (read(r->efd, &v, sizeof(v)) < 0) { /* EAGAIN: already reset */ }
    uf_ring_poll_efd(r);
}

/* The request an entry received, laid out as read(2) on /dev/fuse gives it: the header and
 * the first argument copied in front of the payload (the page before it is the entry's own).
 * NULL if the kernel's lengths do not add up. */
static char *uf_ent_request(struct uf_ent *e)
{
    uint32_t len, payload = e->hdr->ent.payload_sz;
    size_t arg0;
    char *dst;
    memcpy(&len, e->hdr->in_out, sizeof(len));
    memcpy(&e->unique, e->hdr->in_out + 8, sizeof(e->unique));
    if (len < UF_IN_HEADER + payload)
        return NULL;
    arg0 = len - UF_IN_HEADER - payload;
    if (arg0 > UF_OP_IN)
        return NULL;
    dst = e->payload - UF_IN_HEADER - arg0;
    memcpy(dst, e->hdr->in_out, UF_IN_HEADER);
    memcpy(dst + UF_IN_HEADER, e->hdr->op_in, arg0);
    return dst;
}

/* The reply into the entry's buffers (EINVAL instead, if it does not fit). */
static void uf_ent_reply(struct uf_ring *r, struct uf_ent *e, int error, const void *a, size_t alen,
                         const void *b, size_t blen)
{
    struct uf_out_header out;
    if (alen + blen > r->payload_size) {
        error = EINVAL;
        alen = blen = 0;
    }
    /* memmove: a read's data may already lie in this entry's buffer, just in front of the
     * payload (do_read reads into the request, which uf_ent_request put there). */
    if (alen)
        memmove(e->payload, a, alen);
    if (blen)
        memcpy(e->payload + alen, b, blen);
    e->hdr->ent.payload_sz = alen + blen;
    out.len = sizeof(out) + alen + blen;
    out.error = -error;
    out.unique = e->unique;
    memcpy(e->hdr->in_out, &out, sizeof(out));
}

/* Commit a reply and fetch the entry's next request: now if this thread owns the ring, else
 * through the owner. */
static void uf_ring_commit(struct uf_ring *r, struct uf_ent *e)
{
    uint64_t one = 1;
    if (uf_owner) {
        uf_ring_prep(r, e, UF_URING_CMD_COMMIT_AND_FETCH);
        return;
    }
    r->pending[r->npending++] = e;
    if (write(r->efd, &one, sizeof(one)) < 0) { /* the counter is full: the owner wakes anyway */ }
}

static void uf_ring_drain(struct uf_ring *r)
{
    for (int i = 0; i < r->npending; i++)
        uf_ring_prep(r, r->pending[i], UF_URING_CMD_COMMIT_AND_FETCH);
    r->npending = 0;
}

/* Submit what is queued and wait for a completion; 0 or -errno (-EINTR: woken by a signal). */
static int uf_ring_wait(struct uf_ring *r)
{
    int ret = io_uring_submit_and_wait(&r->ring, 1);
    return ret < 0 ? ret : 0;
}

/* Commit now what is queued, without waiting: when more requests are ready, a reply is not to
 * wait for them to be served (a reader waits for its pages). 0 or -errno. */
static int uf_ring_flush(struct uf_ring *r)
{
    int ret;
    if (!io_uring_cq_ready(&r->ring) || !io_uring_sq_ready(&r->ring))
        return 0;
    ret = io_uring_submit(&r->ring);
    return ret < 0 ? ret : 0;
}

/* The next completion: 1 with its user data and result, or 0 if there is none. */
static int uf_ring_next(struct uf_ring *r, uint64_t *data, int *res)
{
    struct io_uring_cqe *cqe;
    if (io_uring_peek_cqe(&r->ring, &cqe) != 0)
        return 0;
    *data = cqe->user_data;
    *res = cqe->res;
    io_uring_cqe_seen(&r->ring, cqe);
    return 1;
}
