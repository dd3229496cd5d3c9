// SPDX-License-Identifier: GPL-2.0
/*
 * svm_shim: mirror a range of another process's address space for svmd.
 *
 * /dev/svm_shim hands out one "range fd" per attached range. A range fd owns
 * an mmu interval notifier on the target mm: snapshots and reads run
 * hmm_range_fault() inside the mmu_interval_read_begin()/read_retry() loop
 * and only use what they found after checking, under svm_shim_range.lock,
 * that no invalidation raced; every invalidation is queued as an event that
 * read()/poll() deliver. The shape follows lib/test_hmm.c.
 *
 * Lifetimes:
 *  - struct svm_shim_range lives from ATTACH to the last fput() of its fd.
 *  - It holds an mmgrab() reference on the target mm (the struct, not the
 *    address space) for the whole time; the address space is pinned with
 *    mmget_not_zero() only around a fault, and never while holding
 *    range->lock (the final mmput() may run exit_mmap(), which calls our
 *    invalidate callback).
 *  - No page reference survives an ioctl; struct page is only touched
 *    between a successful mmu_interval_read_retry() check and the unlock.
 *  - Output fields and SNAPSHOT's entries are written only on success: the
 *    destinations are probed (their own bytes written back) before any work.
 */
#include <linux/anon_inodes.h>
#include <linux/cred.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/hmm.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/mmu_notifier.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/overflow.h>
#include <linux/pid.h>
#include <linux/poll.h>
#include <linux/sched/coredump.h>
#include <linux/sched/mm.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#ifndef SUID_DUMP_USER
#include <linux/sched/exec_state.h>
#endif

#include <uapi/linux/svm_shim.h>

/* Pages faulted and copied per locked step of SVM_SHIM_IOC_READ. */
#define SVM_SHIM_READ_CHUNK_PAGES	64
/* Events copied to userspace per read() step. */
#define SVM_SHIM_EVENT_BATCH		16

struct svm_shim_range {
	struct mmu_interval_notifier notifier;
	struct mm_struct *mm;		/* mmgrab()ed from attach to release */
	struct pid *tgid;		/* the target's, referenced until release */
	unsigned long start;		/* attached [start, end), immutable */
	unsigned long end;
	wait_queue_head_t wq;		/* readers of the event queue */
	/* Serialises event consumers (read()) so a record is delivered once. */
	struct mutex read_lock;
	/*
	 * Guards everything below. Held by the invalidate callback while it
	 * bumps the notifier sequence and queues the event, and by
	 * snapshot/read while they check mmu_interval_read_retry() and use
	 * the result of hmm_range_fault(). Never held across a page fault,
	 * an allocation or mmput(): user copies under it are _nofault.
	 */
	struct mutex lock;
	u64 seq;			/* seq of the newest queued event */
	bool released;			/* the target mm was torn down */
	u32 qlen;			/* capacity of @queue */
	u32 qhead;			/* index of the oldest record */
	u32 qcount;			/* records queued */
	struct svm_shim_event *queue;	/* ring of @qlen records */
};

static u64 svm_shim_event_kind(const struct mmu_notifier_range *range)
{
	switch (range->event) {
	case MMU_NOTIFY_UNMAP:
		return SVM_SHIM_EV_UNMAP;
	case MMU_NOTIFY_CLEAR:
		return SVM_SHIM_EV_CLEAR;
	case MMU_NOTIFY_PROTECTION_VMA:
	case MMU_NOTIFY_SOFT_DIRTY:
		return SVM_SHIM_EV_PROTECTION;
	case MMU_NOTIFY_PROTECTION_PAGE:
		return SVM_SHIM_EV_COW;
	case MMU_NOTIFY_RELEASE:
		return SVM_SHIM_EV_RELEASE;
	case MMU_NOTIFY_MIGRATE:
		return SVM_SHIM_EV_MIGRATE;
	default:
		return SVM_SHIM_EV_OTHER;
	}
}

/*
 * Queue one record; called with range->lock held. When the ring is full,
 * everything queued plus this record collapse into a single whole-range
 * OVERFLOW record: coarser, never lost.
 */
static void svm_shim_queue_event(struct svm_shim_range *r, u64 start, u64 end,
				 u64 kind)
{
	struct svm_shim_event *ev;

	lockdep_assert_held(&r->lock);
	r->seq++;
	if (r->qcount == r->qlen) {
		r->qhead = 0;
		r->qcount = 0;
		start = r->start;
		end = r->end;
		kind = SVM_SHIM_EV_OVERFLOW;
	}
	ev = &r->queue[(r->qhead + r->qcount) % r->qlen];
	ev->seq = r->seq;
	ev->start = start;
	ev->end = end;
	ev->kind = kind;
	r->qcount++;
}

static bool svm_shim_invalidate(struct mmu_interval_notifier *mni,
				const struct mmu_notifier_range *range,
				unsigned long cur_seq)
{
	struct svm_shim_range *r = container_of(mni, struct svm_shim_range,
						notifier);

	/* Never sleep on a non-blockable range: let the kernel retry. */
	if (mmu_notifier_range_blockable(range))
		mutex_lock(&r->lock);
	else if (!mutex_trylock(&r->lock))
		return false;

	mmu_interval_set_seq(mni, cur_seq);
	svm_shim_queue_event(r, max(range->start, r->start),
			     min(range->end, r->end), svm_shim_event_kind(range));
	if (range->event == MMU_NOTIFY_RELEASE)
		r->released = true;
	mutex_unlock(&r->lock);

	wake_up_interruptible_poll(&r->wq, EPOLLIN | EPOLLRDNORM);
	return true;
}

static const struct mmu_interval_notifier_ops svm_shim_mni_ops = {
	.invalidate = svm_shim_invalidate,
};

/*
 * Run hmm_range_fault() on @hr until it succeeds without racing an
 * invalidation. On success returns 0 with r->lock held: the caller may use
 * hr->hmm_pfns (and the pages they name) until it unlocks. The caller holds
 * an mmget_not_zero() reference on r->mm.
 */
static int svm_shim_fault_and_lock(struct svm_shim_range *r,
				   struct hmm_range *hr)
{
	unsigned long timeout = jiffies +
		msecs_to_jiffies(HMM_RANGE_DEFAULT_TIMEOUT);
	int ret;

	for (;;) {
		if (time_after(jiffies, timeout))
			return -EBUSY;
		if (fatal_signal_pending(current))
			return -EINTR;

		hr->notifier_seq = mmu_interval_read_begin(hr->notifier);
		ret = mmap_read_lock_killable(r->mm);
		if (ret)
			return ret;
		ret = hmm_range_fault(hr);
		mmap_read_unlock(r->mm);
		if (ret == -EBUSY) {
			cond_resched();
			continue;
		}
		/*
		 * -EPERM is a write fault on a read-only vma: a CPU store
		 * there faults like any inaccessible page, so say -EFAULT.
		 */
		if (ret == -EPERM)
			return -EFAULT;
		if (ret)
			return ret;

		mutex_lock(&r->lock);
		if (!mmu_interval_read_retry(hr->notifier, hr->notifier_seq))
			return 0;
		mutex_unlock(&r->lock);
		cond_resched();
	}
}

static int svm_shim_check_window(struct svm_shim_range *r, u64 addr, u64 len)
{
	u64 end;

	if (check_add_overflow(addr, len, &end))
		return -EINVAL;
	if (addr < r->start || end > r->end)
		return -ERANGE;
	return 0;
}

/*
 * Fails with -EFAULT unless all of [ubuf, ubuf + len) can be written, without
 * changing it: its bytes are read into @tmp (len bytes) and written back.
 */
static int svm_shim_probe_writable(void __user *ubuf, void *tmp, size_t len)
{
	if (copy_from_user(tmp, ubuf, len))
		return -EFAULT;
	if (copy_to_user(ubuf, tmp, len))
		return -EFAULT;
	return 0;
}

static u64 svm_shim_entry(unsigned long pfn)
{
	u64 e = 0;

	if (pfn & HMM_PFN_ERROR)
		return SVM_SHIM_PAGE_ERROR;
	if (!(pfn & HMM_PFN_VALID))
		return 0;
	e = SVM_SHIM_PAGE_VALID;
	if (pfn & HMM_PFN_WRITE)
		e |= SVM_SHIM_PAGE_WRITE;
	e |= (u64)hmm_pfn_to_map_order(pfn) << SVM_SHIM_PAGE_ORDER_SHIFT;
	return e;
}

static long svm_shim_ioc_snapshot(struct svm_shim_range *r, void __user *uarg)
{
	struct svm_shim_snapshot a;
	struct hmm_range hr = {};
	unsigned long *pfns;
	u64 *entries;
	u64 i, seq;
	int ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.flags & ~(SVM_SHIM_SNAP_FAULT_READ | SVM_SHIM_SNAP_FAULT_WRITE))
		return -EINVAL;
	if ((a.flags & SVM_SHIM_SNAP_FAULT_READ) &&
	    (a.flags & SVM_SHIM_SNAP_FAULT_WRITE))
		return -EINVAL;
	if (a.reserved[0] || a.reserved[1] || a.reserved[2])
		return -EINVAL;
	if (!a.npages || a.npages > SVM_SHIM_MAX_SNAPSHOT_PAGES)
		return -EINVAL;
	if (!PAGE_ALIGNED(a.addr))
		return -EINVAL;
	ret = svm_shim_check_window(r, a.addr, a.npages << PAGE_SHIFT);
	if (ret)
		return ret;

	pfns = kvmalloc_array(a.npages, sizeof(*pfns), GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	entries = kvmalloc_array(a.npages, sizeof(*entries), GFP_KERNEL);
	if (!entries) {
		ret = -ENOMEM;
		goto free_pfns;
	}

	/*
	 * Outputs are written only on success: make sure both destinations
	 * take a write before anything is produced, by writing their own
	 * bytes back. (A caller that unmaps them meanwhile can still see a
	 * partial copy; that is its own race.)
	 */
	ret = svm_shim_probe_writable(u64_to_user_ptr(a.entries), entries,
				      a.npages * sizeof(*entries));
	if (ret)
		goto free_entries;
	if (put_user(a.seq, (u64 __user *)(uarg +
				offsetof(struct svm_shim_snapshot, seq)))) {
		ret = -EFAULT;
		goto free_entries;
	}

	hr.notifier = &r->notifier;
	hr.start = a.addr;
	hr.end = a.addr + (a.npages << PAGE_SHIFT);
	hr.hmm_pfns = pfns;
	if (a.flags & SVM_SHIM_SNAP_FAULT_READ)
		hr.default_flags = HMM_PFN_REQ_FAULT;
	else if (a.flags & SVM_SHIM_SNAP_FAULT_WRITE)
		hr.default_flags = HMM_PFN_REQ_FAULT | HMM_PFN_REQ_WRITE;

	if (!mmget_not_zero(r->mm)) {
		ret = -ESRCH;
		goto free_entries;
	}
	ret = svm_shim_fault_and_lock(r, &hr);
	if (!ret) {
		for (i = 0; i < a.npages; i++)
			entries[i] = svm_shim_entry(pfns[i]);
		seq = r->seq;
		mutex_unlock(&r->lock);
	}
	mmput(r->mm);
	if (ret)
		goto free_entries;

	if (copy_to_user(u64_to_user_ptr(a.entries), entries,
			 a.npages * sizeof(*entries))) {
		ret = -EFAULT;
		goto free_entries;
	}
	if (put_user(seq, (u64 __user *)(uarg +
				offsetof(struct svm_shim_snapshot, seq))))
		ret = -EFAULT;

free_entries:
	kvfree(entries);
free_pfns:
	kvfree(pfns);
	return ret;
}

/*
 * Copy one chunk (inside one window of pages) to @ubuf. Under the lock each
 * page goes straight to the user buffer with page faults disabled; a page
 * whose destination is not resident goes to @bounce instead and is copied
 * out after the unlock (a fault under the lock could recurse into our own
 * invalidate callback). Returns the pages that went to @bounce in @via_bounce,
 * or -EAGAIN when a page needs a bounce buffer and @bounce is NULL.
 */
static int svm_shim_read_chunk(struct svm_shim_range *r, u64 addr, u64 len,
			       char __user *ubuf, void *bounce,
			       unsigned long *pfns, u64 *seq, u64 *via_bounce)
{
	struct hmm_range hr = {
		.notifier = &r->notifier,
		.start = addr & PAGE_MASK,
		.end = PAGE_ALIGN(addr + len),
		.hmm_pfns = pfns,
		.default_flags = HMM_PFN_REQ_FAULT,
	};
	u64 done = 0;
	unsigned long i;
	int ret;

	*via_bounce = 0;
	if (!mmget_not_zero(r->mm))
		return -ESRCH;
	ret = svm_shim_fault_and_lock(r, &hr);
	if (ret)
		goto put_mm;

	for (i = 0; done < len; i++) {
		u64 off = (addr + done) & ~PAGE_MASK;
		u64 n = min_t(u64, PAGE_SIZE - off, len - done);
		struct page *page = hmm_pfn_to_page(pfns[i]);
		void *src = kmap_local_page(page);

		if (copy_to_user_nofault(ubuf + done, src + off, n)) {
			if (!bounce) {
				/* Allocating here could recurse: go back. */
				kunmap_local(src);
				ret = -EAGAIN;
				break;
			}
			memcpy(bounce + done, src + off, n);
			*via_bounce |= 1ULL << i;
		}
		kunmap_local(src);
		done += n;
	}
	*seq = r->seq;
	mutex_unlock(&r->lock);
put_mm:
	mmput(r->mm);
	return ret;
}

static long svm_shim_ioc_read(struct svm_shim_range *r, void __user *uarg)
{
	const u64 chunk = SVM_SHIM_READ_CHUNK_PAGES * PAGE_SIZE;
	struct svm_shim_read a;
	unsigned long *pfns;
	char __user *ubuf;
	void *bounce;
	u64 done, seq, via_bounce, first_seq = 0;
	int ret;

	BUILD_BUG_ON(SVM_SHIM_READ_CHUNK_PAGES > 64);
	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.flags || a.reserved[0] || a.reserved[1] || a.reserved[2])
		return -EINVAL;
	if (!a.length || a.length > SVM_SHIM_MAX_READ_BYTES)
		return -EINVAL;
	ret = svm_shim_check_window(r, a.addr, a.length);
	if (ret)
		return ret;
	ubuf = u64_to_user_ptr(a.buf);
	if (!access_ok(ubuf, a.length))
		return -EFAULT;
	/* @seq must not fail once the buffer was written: probe it first. */
	if (put_user(a.seq, (u64 __user *)(uarg +
				offsetof(struct svm_shim_read, seq))))
		return -EFAULT;

	pfns = kmalloc_array(SVM_SHIM_READ_CHUNK_PAGES, sizeof(*pfns),
			     GFP_KERNEL);
	if (!pfns)
		return -ENOMEM;
	/* Allocated on first need only: usually the user buffer is resident. */
	bounce = NULL;

	for (done = 0; done < a.length; ) {
		u64 addr = a.addr + done;
		/* Stop each chunk at a chunk-aligned address. */
		u64 n = min_t(u64, a.length - done,
			      chunk - (addr & (chunk - 1)));
		u64 pos = 0;
		unsigned long i;

		ret = svm_shim_read_chunk(r, addr, n, ubuf + done, bounce, pfns,
					  &seq, &via_bounce);
		if (ret == -EAGAIN && !bounce) {
			/* A chunk never holds more than @chunk bytes. */
			bounce = kvmalloc(min(chunk, a.length), GFP_KERNEL);
			if (!bounce) {
				ret = -ENOMEM;
				goto free_pfns;
			}
			continue;
		}
		if (ret)
			goto free_pfns;
		/* The data is only as fresh as its oldest chunk. */
		if (!done)
			first_seq = seq;
		for (i = 0; pos < n; i++) {
			u64 m = min_t(u64, PAGE_SIZE - ((addr + pos) & ~PAGE_MASK),
				      n - pos);

			if ((via_bounce & (1ULL << i)) &&
			    copy_to_user(ubuf + done + pos, bounce + pos, m)) {
				ret = -EFAULT;
				goto free_pfns;
			}
			pos += m;
		}
		done += n;
	}
	if (put_user(first_seq, (u64 __user *)(uarg +
				offsetof(struct svm_shim_read, seq))))
		ret = -EFAULT;

free_pfns:
	kvfree(bounce);
	kfree(pfns);
	return ret;
}

static long svm_shim_ioc_query(void __user *uarg)
{
	struct svm_shim_query q;

	if (copy_from_user(&q, uarg, sizeof(q)))
		return -EFAULT;
	if (q.reserved[0] || q.reserved[1])
		return -EINVAL;
	/* All or nothing: the struct takes its own bytes back first. */
	if (copy_to_user(uarg, &q, sizeof(q)))
		return -EFAULT;
	q.version = SVM_SHIM_VERSION;
	q.features = SVM_SHIM_FEAT_ATTACH_PID | SVM_SHIM_FEAT_SNAPSHOT |
		     SVM_SHIM_FEAT_READ | SVM_SHIM_FEAT_EVENTS |
		     SVM_SHIM_FEAT_RANGE_INFO | SVM_SHIM_FEAT_RANGE_OBJECT;
	q.max_snapshot_pages = SVM_SHIM_MAX_SNAPSHOT_PAGES;
	q.max_read_bytes = SVM_SHIM_MAX_READ_BYTES;
	q.max_queue_len = SVM_SHIM_MAX_QUEUE_LEN;
	q.page_size = PAGE_SIZE;
	if (copy_to_user(uarg, &q, sizeof(q)))
		return -EFAULT;
	return 0;
}

static long svm_shim_ioc_range_info(struct svm_shim_range *r,
				    void __user *uarg)
{
	struct svm_shim_range_info ri;

	if (copy_from_user(&ri, uarg, sizeof(ri)))
		return -EFAULT;
	if (memchr_inv(ri.reserved, 0, sizeof(ri.reserved)))
		return -EINVAL;
	/* All or nothing: the struct takes its own bytes back first. */
	if (copy_to_user(uarg, &ri, sizeof(ri)))
		return -EFAULT;
	ri.start = r->start;
	ri.length = r->end - r->start;
	rcu_read_lock();
	ri.pid = pid_has_task(r->tgid, PIDTYPE_TGID) ? pid_vnr(r->tgid) : 0;
	rcu_read_unlock();
	if (copy_to_user(uarg, &ri, sizeof(ri)))
		return -EFAULT;
	return 0;
}

/*
 * Compares inodes, not numbers a caller could choose: the answer holds for
 * the object the caller holds open, at the instant the mmap lock was held.
 */
static long svm_shim_ioc_range_object(struct svm_shim_range *r,
				      void __user *uarg)
{
	struct svm_shim_range_object ro;
	struct vm_area_struct *vma;
	struct file *file;
	long ret;

	if (copy_from_user(&ro, uarg, sizeof(ro)))
		return -EFAULT;
	if (memchr_inv(ro.reserved, 0, sizeof(ro.reserved)) || ro.fd > INT_MAX)
		return -EINVAL;
	file = fget(ro.fd);
	if (!file)
		return -EBADF;
	ret = -ESRCH;
	if (!mmget_not_zero(r->mm))
		goto out_fput;
	ret = mmap_read_lock_killable(r->mm);
	if (ret)
		goto out_mmput;
	ret = -ENXIO;
	vma = vma_lookup(r->mm, r->start);
	if (vma && vma->vm_file && (vma->vm_flags & VM_SHARED) &&
	    (vma->vm_flags & VM_READ) && vma->vm_end >= r->end &&
	    file_inode(vma->vm_file) == file_inode(file)) {
		ro.offset = ((u64)vma->vm_pgoff << PAGE_SHIFT) +
			    (r->start - vma->vm_start);
		ret = 0;
	}
	mmap_read_unlock(r->mm);
	if (!ret && copy_to_user(uarg, &ro, sizeof(ro)))
		ret = -EFAULT;
out_mmput:
	mmput(r->mm);
out_fput:
	fput(file);
	return ret;
}

static bool svm_shim_events_ready(struct svm_shim_range *r)
{
	return READ_ONCE(r->qcount) || READ_ONCE(r->released);
}

/*
 * Records are peeked, copied out without the lock held, then popped only if
 * no overflow collapse replaced them meanwhile; a failed copy loses nothing.
 */
static ssize_t svm_shim_range_read(struct file *file, char __user *buf,
				   size_t count, loff_t *ppos)
{
	struct svm_shim_range *r = file->private_data;
	struct svm_shim_event ev[SVM_SHIM_EVENT_BATCH];
	size_t want = min_t(size_t, count / sizeof(ev[0]),
			    SVM_SHIM_EVENT_BATCH);
	size_t n, i;
	ssize_t ret;

	if (!want)
		return -EINVAL;

	ret = mutex_lock_interruptible(&r->read_lock);
	if (ret)
		return ret;
	for (;;) {
		mutex_lock(&r->lock);
		if (r->qcount)
			break;
		if (r->released) {
			mutex_unlock(&r->lock);
			ret = 0;
			goto unlock_read;
		}
		mutex_unlock(&r->lock);
		if (file->f_flags & O_NONBLOCK) {
			ret = -EAGAIN;
			goto unlock_read;
		}
		ret = wait_event_interruptible(r->wq, svm_shim_events_ready(r));
		if (ret)
			goto unlock_read;
	}
	n = min_t(size_t, want, r->qcount);
	for (i = 0; i < n; i++)
		ev[i] = r->queue[(r->qhead + i) % r->qlen];
	mutex_unlock(&r->lock);

	if (copy_to_user(buf, ev, n * sizeof(ev[0]))) {
		ret = -EFAULT;
		goto unlock_read;
	}

	mutex_lock(&r->lock);
	if (r->qcount >= n && r->queue[r->qhead].seq == ev[0].seq) {
		r->qhead = (r->qhead + n) % r->qlen;
		r->qcount -= n;
	}
	mutex_unlock(&r->lock);
	ret = n * sizeof(ev[0]);
unlock_read:
	mutex_unlock(&r->read_lock);
	return ret;
}

static __poll_t svm_shim_range_poll(struct file *file, poll_table *wait)
{
	struct svm_shim_range *r = file->private_data;
	__poll_t mask = 0;

	poll_wait(file, &r->wq, wait);
	mutex_lock(&r->lock);
	if (r->qcount)
		mask |= EPOLLIN | EPOLLRDNORM;
	if (r->released)
		mask |= EPOLLHUP;
	mutex_unlock(&r->lock);
	return mask;
}

static long svm_shim_range_ioctl(struct file *file, unsigned int cmd,
				 unsigned long arg)
{
	struct svm_shim_range *r = file->private_data;
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case SVM_SHIM_IOC_QUERY:
		return svm_shim_ioc_query(uarg);
	case SVM_SHIM_IOC_SNAPSHOT:
		return svm_shim_ioc_snapshot(r, uarg);
	case SVM_SHIM_IOC_READ:
		return svm_shim_ioc_read(r, uarg);
	case SVM_SHIM_IOC_RANGE_INFO:
		return svm_shim_ioc_range_info(r, uarg);
	case SVM_SHIM_IOC_RANGE_OBJECT:
		return svm_shim_ioc_range_object(r, uarg);
	default:
		return -ENOTTY;
	}
}

static int svm_shim_range_release(struct inode *inode, struct file *file)
{
	struct svm_shim_range *r = file->private_data;

	/* Waits for a running invalidate; works after the target exited. */
	mmu_interval_notifier_remove(&r->notifier);
	mmdrop(r->mm);
	put_pid(r->tgid);
	kvfree(r->queue);
	kfree(r);
	return 0;
}

static const struct file_operations svm_shim_range_fops = {
	.owner		= THIS_MODULE,
	.read		= svm_shim_range_read,
	.poll		= svm_shim_range_poll,
	.unlocked_ioctl	= svm_shim_range_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.release	= svm_shim_range_release,
	.llseek		= noop_llseek,
};

static bool svm_shim_target_dumpable(struct task_struct *task,
				     struct mm_struct *mm)
{
#ifdef SUID_DUMP_USER
	return get_dumpable(mm) == SUID_DUMP_USER ||
	       ns_capable(mm->user_ns, CAP_SYS_PTRACE);
#else
	struct task_exec_state *es;
	bool ok;

	rcu_read_lock();
	es = rcu_dereference(task->exec_state);
	ok = es->dumpable == TASK_DUMPABLE_OWNER ||
	     ns_capable(es->user_ns, CAP_SYS_PTRACE);
	rcu_read_unlock();
	return ok;
#endif
}

/*
 * ptrace_may_access(task, PTRACE_MODE_ATTACH_REALCREDS) is not exported to
 * modules, so this is its credential and dumpability logic on exported
 * helpers: same thread group; or real uid/gid of the caller equal to every
 * uid/gid of the target, or CAP_SYS_PTRACE in the target's user namespace;
 * and a non-dumpable target needs CAP_SYS_PTRACE. LSM ptrace hooks (Yama)
 * cannot be consulted from a module.
 */
static bool svm_shim_may_attach(struct task_struct *task, struct mm_struct *mm)
{
	const struct cred *cred, *tcred;
	bool ok;

	if (same_thread_group(task, current))
		return true;

	rcu_read_lock();
	cred = current_cred();
	tcred = __task_cred(task);
	ok = (uid_eq(cred->uid, tcred->euid) &&
	      uid_eq(cred->uid, tcred->suid) &&
	      uid_eq(cred->uid, tcred->uid) &&
	      gid_eq(cred->gid, tcred->egid) &&
	      gid_eq(cred->gid, tcred->sgid) &&
	      gid_eq(cred->gid, tcred->gid)) ||
	     ns_capable(tcred->user_ns, CAP_SYS_PTRACE);
	rcu_read_unlock();
	if (!ok)
		return false;
	return svm_shim_target_dumpable(task, mm);
}

/*
 * Returns the target's mm with an mmget() reference, or an ERR_PTR; on
 * success *@tgid is the target's thread-group pid, referenced.
 */
static struct mm_struct *svm_shim_target_mm(u64 target, struct pid **tgid)
{
	struct task_struct *task;
	struct mm_struct *mm;
	struct pid *pid;
	int ret;

	if (!target || target > INT_MAX)
		return ERR_PTR(-EINVAL);
	pid = find_get_pid((pid_t)target);
	if (!pid)
		return ERR_PTR(-ESRCH);
	task = get_pid_task(pid, PIDTYPE_PID);
	put_pid(pid);
	if (!task)
		return ERR_PTR(-ESRCH);

	/* As mm_access(): no exec may switch creds/mm under the check. */
	ret = down_read_killable(&task->signal->exec_update_lock);
	if (ret) {
		mm = ERR_PTR(ret);
		goto put_task;
	}
	mm = get_task_mm(task);
	if (!mm) {
		mm = ERR_PTR(-ESRCH);
	} else if (!svm_shim_may_attach(task, mm)) {
		mmput(mm);
		mm = ERR_PTR(-EPERM);
	} else {
		*tgid = get_task_pid(task, PIDTYPE_TGID);
	}
	up_read(&task->signal->exec_update_lock);
put_task:
	put_task_struct(task);
	return mm;
}

static long svm_shim_ioc_attach(void __user *uarg)
{
	struct svm_shim_attach a;
	struct svm_shim_range *r;
	struct pid *tgid = NULL;
	struct mm_struct *mm;
	struct file *file;
	u64 end, qlen;
	int fd, ret;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.reserved[0] || a.reserved[1] || a.fd)
		return -EINVAL;
	if (a.flags != SVM_SHIM_ATTACH_PID && a.flags != SVM_SHIM_ATTACH_PIDFD)
		return -EINVAL;
	if (!a.start || !a.length || !PAGE_ALIGNED(a.start) ||
	    !PAGE_ALIGNED(a.length))
		return -EINVAL;
	if (check_add_overflow(a.start, a.length, &end) || end > TASK_SIZE)
		return -EINVAL;
	qlen = a.queue_len ? a.queue_len : SVM_SHIM_DEF_QUEUE_LEN;
	if (qlen > SVM_SHIM_MAX_QUEUE_LEN)
		return -EINVAL;
	/* pidfd_get_pid() is not exported to modules on 6.1 nor 7.x. */
	if (a.flags == SVM_SHIM_ATTACH_PIDFD)
		return -EOPNOTSUPP;

	mm = svm_shim_target_mm(a.target, &tgid);
	if (IS_ERR(mm))
		return PTR_ERR(mm);

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r) {
		ret = -ENOMEM;
		goto put_mm;
	}
	r->queue = kvcalloc(qlen, sizeof(*r->queue), GFP_KERNEL);
	if (!r->queue) {
		ret = -ENOMEM;
		goto free_range;
	}
	r->qlen = qlen;
	r->start = a.start;
	r->end = end;
	mutex_init(&r->lock);
	mutex_init(&r->read_lock);
	init_waitqueue_head(&r->wq);
	mmgrab(mm);
	r->mm = mm;
	r->tgid = tgid;

	ret = mmu_interval_notifier_insert(&r->notifier, mm, a.start, a.length,
					   &svm_shim_mni_ops);
	if (ret)
		goto drop_mm;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		ret = fd;
		goto remove_notifier;
	}
	file = anon_inode_getfile("[svm_shim_range]", &svm_shim_range_fops, r,
				  O_RDWR);
	if (IS_ERR(file)) {
		ret = PTR_ERR(file);
		goto put_fd;
	}
	if (put_user((u64)fd, (u64 __user *)(uarg +
				offsetof(struct svm_shim_attach, fd)))) {
		/* The file owns @r now: its release undoes the attach. */
		fput(file);
		put_unused_fd(fd);
		mmput(mm);
		return -EFAULT;
	}
	fd_install(fd, file);
	mmput(mm);
	return fd;

put_fd:
	put_unused_fd(fd);
remove_notifier:
	mmu_interval_notifier_remove(&r->notifier);
drop_mm:
	mmdrop(mm);
	kvfree(r->queue);
free_range:
	kfree(r);
put_mm:
	put_pid(tgid);
	mmput(mm);
	return ret;
}

static long svm_shim_dev_ioctl(struct file *file, unsigned int cmd,
			       unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case SVM_SHIM_IOC_QUERY:
		return svm_shim_ioc_query(uarg);
	case SVM_SHIM_IOC_ATTACH:
		return svm_shim_ioc_attach(uarg);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations svm_shim_dev_fops = {
	.owner		= THIS_MODULE,
	.unlocked_ioctl	= svm_shim_dev_ioctl,
	.compat_ioctl	= compat_ptr_ioctl,
	.llseek		= noop_llseek,
};

static struct miscdevice svm_shim_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= "svm_shim",
	.fops	= &svm_shim_dev_fops,
	.mode	= 0600,
};

static int __init svm_shim_init(void)
{
	return misc_register(&svm_shim_misc);
}

static void __exit svm_shim_exit(void)
{
	misc_deregister(&svm_shim_misc);
}

module_init(svm_shim_init);
module_exit(svm_shim_exit);

MODULE_DESCRIPTION("svm: mirror a process address range (HMM + interval notifier)");
MODULE_LICENSE("GPL");
