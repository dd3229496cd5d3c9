/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * svm_shim: mirror a range of another process's address space.
 *
 * /dev/svm_shim accepts SVM_SHIM_IOC_QUERY and SVM_SHIM_IOC_ATTACH. ATTACH
 * returns a new "range fd" bound to one address range of one target mm; the
 * other ioctls act on a range fd, and read()/poll() on it deliver
 * invalidation events. Closing the range fd detaches.
 *
 * A range fd is a capability: whoever holds it may read the range, whatever
 * its own credentials. The right to the memory is checked once, at ATTACH,
 * on the attaching process (the ptrace rule); a process may then hand the
 * fd to another (SCM_RIGHTS), which learns what it holds with RANGE_INFO.
 *
 * Consistency (the mirror contract):
 *  - SNAPSHOT and READ use hmm_range_fault() inside an mmu interval notifier
 *    read_begin/read_retry loop; results are only produced after the shim
 *    checked, under its lock, that no invalidation raced with the walk. No
 *    page reference is held after an ioctl returns.
 *  - Every invalidation of the attached range (munmap, zap, mprotect, COW
 *    write-protection at fork, migration, exit, ...) is queued as one
 *    struct svm_shim_event with a strictly increasing seq. The queue is
 *    bounded; when it would overflow, everything queued collapses into ONE
 *    record of kind SVM_SHIM_EV_OVERFLOW covering the whole range. An
 *    invalidation is never lost.
 *  - SNAPSHOT and READ report the seq of the newest event queued at the
 *    instant their result was validated (READ: its oldest chunk's). Treat
 *    the result as stale wherever an event with a larger seq covers it.
 *  - CPU stores do not invalidate: a mapping change does.
 *
 * Errors common to SNAPSHOT and READ: -ESRCH once the target mm is gone,
 * -EFAULT for an inaccessible page (as a CPU access), -ERANGE for a window
 * outside the attached range, -EBUSY when the range kept being invalidated
 * for a whole second (retry), -EINTR on a fatal signal.
 *
 * ABI rules: all fields are __u64; pointers are passed as __u64; reserved
 * fields and unknown flags must be zero (else -EINVAL); unknown ioctls fail
 * with -ENOTTY. Fields are marked (in) or (out). Output fields, and
 * SNAPSHOT's entries, are written only on success (a failed call leaves them
 * as they were); READ's destination buffer holds unspecified bytes after a
 * failure.
 */
#ifndef _UAPI_LINUX_SVM_SHIM_H
#define _UAPI_LINUX_SVM_SHIM_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define SVM_SHIM_VERSION		1

/* Feature bits reported by SVM_SHIM_IOC_QUERY. */
#define SVM_SHIM_FEAT_ATTACH_PID	(1ULL << 0)
#define SVM_SHIM_FEAT_ATTACH_PIDFD	(1ULL << 1)
#define SVM_SHIM_FEAT_SNAPSHOT		(1ULL << 2)
#define SVM_SHIM_FEAT_READ		(1ULL << 3)
#define SVM_SHIM_FEAT_EVENTS		(1ULL << 4)
#define SVM_SHIM_FEAT_RANGE_INFO	(1ULL << 5)
#define SVM_SHIM_FEAT_RANGE_OBJECT	(1ULL << 6)

/* Limits (the per-call and queue limits are also reported by QUERY). */
#define SVM_SHIM_MAX_RANGES_PER_FD	1	/* one range per range fd */
#define SVM_SHIM_MAX_SNAPSHOT_PAGES	65536	/* pages per SNAPSHOT call */
#define SVM_SHIM_MAX_READ_BYTES		(16ULL << 20)	/* bytes per READ call */
#define SVM_SHIM_DEF_QUEUE_LEN		256	/* events queued per range fd */
#define SVM_SHIM_MAX_QUEUE_LEN		65536

struct svm_shim_query {
	__u64 version;		/* (out) SVM_SHIM_VERSION */
	__u64 features;		/* (out) SVM_SHIM_FEAT_* */
	__u64 max_snapshot_pages;	/* (out) SVM_SHIM_MAX_SNAPSHOT_PAGES */
	__u64 max_read_bytes;	/* (out) SVM_SHIM_MAX_READ_BYTES */
	__u64 max_queue_len;	/* (out) SVM_SHIM_MAX_QUEUE_LEN */
	__u64 page_size;	/* (out) PAGE_SIZE of the running kernel */
	__u64 reserved[2];	/* (in) must be zero */
};

/*
 * SVM_SHIM_IOC_ATTACH flags: exactly one of PID / PIDFD. PIDFD is accepted
 * only where QUERY reports SVM_SHIM_FEAT_ATTACH_PIDFD (kernels that let a
 * module resolve a pidfd; none of 6.1 and 7.2 does), else -EOPNOTSUPP. With
 * PID, a caller that holds a pidfd can check the process is still the same
 * one after attaching (pidfd_send_signal(pidfd, 0, ...)).
 */
#define SVM_SHIM_ATTACH_PID		(1ULL << 0)	/* target is a pid */
#define SVM_SHIM_ATTACH_PIDFD		(1ULL << 1)	/* target is a pidfd */

/*
 * Attach to [start, start + length) of the target's address space. The
 * caller must be allowed to ptrace-attach to the target
 * (PTRACE_MODE_ATTACH_REALCREDS) else -EPERM/-EACCES. The range need not be
 * mapped yet. On success the ioctl returns the new range fd (O_CLOEXEC,
 * O_RDWR); it is also stored in @fd.
 */
struct svm_shim_attach {
	__u64 flags;		/* (in) SVM_SHIM_ATTACH_* */
	__u64 target;		/* (in) pid or pidfd, per flags */
	__u64 start;		/* (in) page aligned, non-zero */
	__u64 length;		/* (in) page aligned, non-zero, no wrap */
	__u64 queue_len;	/* (in) event queue length, 0: default */
	__u64 fd;		/* (out) the range fd */
	__u64 reserved[2];	/* (in) must be zero */
};

/* One SNAPSHOT entry per page. An entry of 0 means "not present". */
#define SVM_SHIM_PAGE_VALID		(1ULL << 0)	/* present, readable */
#define SVM_SHIM_PAGE_WRITE		(1ULL << 1)	/* writable mapping */
#define SVM_SHIM_PAGE_ERROR		(1ULL << 2)	/* no vma / no access */
#define SVM_SHIM_PAGE_ORDER_SHIFT	8	/* bits 8..15: log2(mapping pages) */
#define SVM_SHIM_PAGE_ORDER_MASK	(0xffULL << SVM_SHIM_PAGE_ORDER_SHIFT)

/* SVM_SHIM_IOC_SNAPSHOT flags (at most one). */
#define SVM_SHIM_SNAP_FAULT_READ	(1ULL << 0)	/* fault in like a CPU read */
#define SVM_SHIM_SNAP_FAULT_WRITE	(1ULL << 1)	/* fault in like a CPU write */

/*
 * Snapshot the state of pages [addr, addr + npages * PAGE_SIZE), which must
 * lie inside the attached range. Without a FAULT flag nothing is faulted in.
 * With one, an inaccessible page fails the call with -EFAULT exactly as a
 * CPU access would. The target having exited fails with -ESRCH.
 */
struct svm_shim_snapshot {
	__u64 flags;		/* (in) SVM_SHIM_SNAP_* */
	__u64 addr;		/* (in) page aligned */
	__u64 npages;		/* (in) 1..SVM_SHIM_MAX_SNAPSHOT_PAGES */
	__u64 entries;		/* (in) user pointer to npages __u64 */
	__u64 seq;		/* (out) newest event seq the result is valid for */
	__u64 reserved[3];	/* (in) must be zero */
};

/*
 * Copy [addr, addr + length) of the target into the buffer at @buf. The
 * range must lie inside the attached range; no alignment is required.
 * Pages are faulted in like a CPU read; an unmapped or PROT_NONE page fails
 * the call with -EFAULT. Each page is copied atomically with respect to
 * mapping changes (never from a page being unmapped or migrated).
 */
struct svm_shim_read {
	__u64 flags;		/* (in) must be zero */
	__u64 addr;		/* (in) target address */
	__u64 length;		/* (in) 1..SVM_SHIM_MAX_READ_BYTES */
	__u64 buf;		/* (in) user pointer, length bytes */
	__u64 seq;		/* (out) newest event seq the data is valid for */
	__u64 reserved[3];	/* (in) must be zero */
};

/*
 * What a range fd is attached to. Fails with -ENOTTY on anything but a range
 * fd (in particular on /dev/svm_shim itself).
 */
struct svm_shim_range_info {
	__u64 start;		/* (out) attached range, as given to ATTACH */
	__u64 length;		/* (out) */
	__u64 pid;		/* (out) target's thread-group id in the caller's
				 * pid namespace; 0 once it exited or when it is
				 * not visible there */
	__u64 reserved[5];	/* (in) must be zero */
};

/*
 * Whether the range maps the object behind @fd, so that a holder of the
 * range fd can map that object itself (the zero-copy path) on the kernel's
 * word instead of the depositor's: the mapping at the range's start must
 * be a readable shared mapping of the very inode @fd's file refers to
 * (memfd, shmem, tmpfs, hugetlbfs, a regular file, a device) and cover the
 * whole range. On success @offset is the byte offset of the range's start
 * in the object. -ENXIO when it does not (nothing mapped there, a private or
 * anonymous mapping, one that ends inside the range, another object),
 * -EBADF for a bad @fd, -ESRCH once the target mm is gone. Fails with
 * -ENOTTY on anything but a range fd.
 */
struct svm_shim_range_object {
	__u64 fd;		/* (in) an open file of the object */
	__u64 offset;		/* (out) */
	__u64 reserved[6];	/* (in) must be zero */
};

/* Event kinds (struct svm_shim_event.kind). */
enum svm_shim_event_kind {
	SVM_SHIM_EV_OTHER	= 0,	/* any other invalidation */
	SVM_SHIM_EV_UNMAP	= 1,	/* munmap, mremap move: vma gone */
	SVM_SHIM_EV_CLEAR	= 2,	/* ptes zapped: MADV_DONTNEED, CPU page migration, COW break, reclaim */
	SVM_SHIM_EV_PROTECTION	= 3,	/* mprotect, soft-dirty clear */
	SVM_SHIM_EV_COW		= 4,	/* pages write-protected: fork COW or write-back */
	SVM_SHIM_EV_MIGRATE	= 5,	/* device migration (migrate_vma) */
	SVM_SHIM_EV_RELEASE	= 6,	/* target mm torn down (exit/exec) */
	SVM_SHIM_EV_OVERFLOW	= 7,	/* queue overflowed: whole range invalid */
};

/*
 * read() on a range fd returns whole records; a buffer smaller than one
 * record fails with -EINVAL. It blocks while the queue is empty (unless
 * O_NONBLOCK: -EAGAIN), and returns 0 once the target mm was released and
 * the queue is drained. poll() reports EPOLLIN when records are queued and
 * EPOLLHUP after release.
 */
struct svm_shim_event {
	__u64 seq;		/* strictly increasing per range fd, from 1 */
	__u64 start;		/* invalidated [start, end), clipped to the range */
	__u64 end;
	__u64 kind;		/* enum svm_shim_event_kind */
};

#define SVM_SHIM_IOC_MAGIC	0xB9	/* free in ioctl-number.rst (6.1) and 7.2 uapi */

#define SVM_SHIM_IOC_QUERY	_IOWR(SVM_SHIM_IOC_MAGIC, 0x00, struct svm_shim_query)
#define SVM_SHIM_IOC_ATTACH	_IOWR(SVM_SHIM_IOC_MAGIC, 0x01, struct svm_shim_attach)
#define SVM_SHIM_IOC_SNAPSHOT	_IOWR(SVM_SHIM_IOC_MAGIC, 0x02, struct svm_shim_snapshot)
#define SVM_SHIM_IOC_READ	_IOWR(SVM_SHIM_IOC_MAGIC, 0x03, struct svm_shim_read)
#define SVM_SHIM_IOC_RANGE_INFO	_IOWR(SVM_SHIM_IOC_MAGIC, 0x04, struct svm_shim_range_info)
#define SVM_SHIM_IOC_RANGE_OBJECT	_IOWR(SVM_SHIM_IOC_MAGIC, 0x05, struct svm_shim_range_object)

#endif /* _UAPI_LINUX_SVM_SHIM_H */
