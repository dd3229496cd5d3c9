// SPDX-License-Identifier: GPL-2.0
/*
 * svm_shim behaviour tests, run as root in a guest with the module loaded
 * (tests/vm/run-vm.sh). Modelled on tools/testing/selftests/mm/hmm-tests.c:
 * every test maps memory, attaches, changes the mapping the way a program
 * would, and checks what the shim reports: page state, data, invalidation
 * events. Negative cases are tests of their own.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "shim_harness.h"
#include "shim_util.h"

#define MAXEV 4096

static long psz;

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	/* Keep small test mappings out of THP so one zap is one event. */
	madvise(p, len, MADV_NOHUGEPAGE);
	return p;
}

static int dev_or_skip(void)
{
	int dev = shim_open();

	if (dev < 0)
		SKIP("cannot open " SHIM_DEV ": %s", strerror(errno));
	return dev;
}

/* Some drained event of @kind (any kind if < 0) covers [a, b). */
static int covered(const struct svm_shim_event *ev, int n, long kind,
		   const void *a, const void *b)
{
	for (int i = 0; i < n; i++)
		if ((kind < 0 || ev[i].kind == (uint64_t)kind) &&
		    ev[i].start <= (uint64_t)(uintptr_t)a &&
		    ev[i].end >= (uint64_t)(uintptr_t)b)
			return 1;
	return 0;
}

static int seqs_increasing(const struct svm_shim_event *ev, int n)
{
	for (int i = 1; i < n; i++)
		if (ev[i].seq <= ev[i - 1].seq)
			return 0;
	return 1;
}

static void fill(void *p, size_t len, unsigned int seed)
{
	unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		c[i] = (unsigned char)(seed + i * 7 + i / 4096);
}

static int check_fill(const void *p, size_t len, unsigned int seed, size_t off)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		if (c[i] != (unsigned char)(seed + (i + off) * 7 +
					    (i + off) / 4096))
			return 0;
	return 1;
}

static int nr_numa_nodes(void)
{
	char path[64];
	int n = 0;

	for (;;) {
		snprintf(path, sizeof(path), "/sys/devices/system/node/node%d", n);
		if (access(path, F_OK))
			return n;
		n++;
	}
}

/* ---------------------------------------------------------------- query */

TEST(query)
{
	struct svm_shim_query q;
	int dev = dev_or_skip();

	memset(&q, 0, sizeof(q));
	ASSERT_EQ(ioctl(dev, SVM_SHIM_IOC_QUERY, &q), 0);
	EXPECT_EQ(q.version, SVM_SHIM_VERSION);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_ATTACH_PID);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_SNAPSHOT);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_READ);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_EVENTS);
	EXPECT_EQ(q.page_size, psz);
	EXPECT_EQ(q.max_snapshot_pages, SVM_SHIM_MAX_SNAPSHOT_PAGES);
	EXPECT_EQ(q.max_read_bytes, SVM_SHIM_MAX_READ_BYTES);
	q.reserved[1] = 1;
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_QUERY, &q), EINVAL);
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_QUERY, NULL), EFAULT);
	close(dev);
}

/* ------------------------------------------------------ anonymous memory */

TEST(anon_snapshot_and_read)
{
	const int n = 64;
	uint64_t ent[64], seq = 99;
	unsigned char *p = map_anon(n * psz), *buf = malloc(n * psz);
	int dev = dev_or_skip(), fd;

	ASSERT_TRUE(p && buf);
	for (int i = 0; i < n; i += 2)
		fill(p + i * psz, psz, i);
	fd = shim_attach(dev, getpid(), p, n * psz, 0);
	ASSERT_TRUE(fd >= 0);

	/* No fault: written pages valid+writable, untouched ones absent. */
	ASSERT_EQ(shim_snapshot(fd, 0, p, n, ent, &seq), 0);
	EXPECT_EQ(seq, 0);
	for (int i = 0; i < n; i++) {
		if (i % 2 == 0) {
			EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
			EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_WRITE);
			EXPECT_EQ((ent[i] & SVM_SHIM_PAGE_ORDER_MASK), 0);
		} else {
			EXPECT_EQ(ent[i], 0);
		}
	}
	/* Fault for read: every page readable; holes become the zero page. */
	ASSERT_EQ(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, p, n, ent, NULL), 0);
	for (int i = 0; i < n; i++)
		EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
	EXPECT_TRUE(!(ent[1] & SVM_SHIM_PAGE_WRITE));

	memset(buf, 0xee, n * psz);
	ASSERT_EQ(shim_read(fd, p, n * psz, buf, &seq), 0);
	ASSERT_EQ(memcmp(buf, p, n * psz), 0);
	/* Unaligned, page-crossing window. */
	ASSERT_EQ(shim_read(fd, p + 2 * psz + 100, psz + 77, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, psz - 100, 2, 100));
	/* Fault for write: all pages writable afterwards (COW of zero page). */
	ASSERT_EQ(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_WRITE, p, n, ent, NULL), 0);
	for (int i = 0; i < n; i++)
		EXPECT_EQ(ent[i] & (SVM_SHIM_PAGE_VALID | SVM_SHIM_PAGE_WRITE),
			  SVM_SHIM_PAGE_VALID | SVM_SHIM_PAGE_WRITE);
	EXPECT_EQ(p[psz], 0);
	/* A store is not a mapping change: no event, and reads see it. */
	p[3] = 0x5a;
	ASSERT_EQ(shim_read(fd, p + 3, 1, buf, NULL), 0);
	EXPECT_EQ(buf[0], 0x5a);
	close(fd);
	close(dev);
}

TEST(anon_other_process)
{
	int dev = dev_or_skip(), fd, p2c[2], c2p[2];
	unsigned char *p = map_anon(16 * psz), buf[64];
	pid_t pid;
	char c;

	ASSERT_TRUE(p);
	ASSERT_EQ(pipe(p2c), 0);
	ASSERT_EQ(pipe(c2p), 0);
	pid = fork();
	if (pid == 0) {
		fill(p, 16 * psz, 42); /* the child's own copy */
		if (write(c2p[1], "r", 1) != 1 || read(p2c[0], &c, 1) != 1)
			_exit(1);
		_exit(0);
	}
	ASSERT_EQ(read(c2p[0], &c, 1), 1);
	memset(p, 0, 16 * psz); /* the parent's copy differs */
	fd = shim_attach(dev, pid, p, 16 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, p + 5 * psz, sizeof(buf), buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, sizeof(buf), 42, 5 * psz));
	ASSERT_EQ(write(p2c[1], "x", 1), 1);
	waitpid(pid, NULL, 0);
	close(fd);
	close(dev);
}

/* ------------------------------------------- shared, file, tmpfs mappings */

TEST(shared_memfd)
{
	const int n = 32;
	int dev = dev_or_skip(), mfd, fd;
	unsigned char *a, *b, *buf = malloc(n * psz);
	uint64_t ent[32];

	mfd = memfd_create("svm_shim_test", MFD_CLOEXEC);
	ASSERT_TRUE(mfd >= 0);
	ASSERT_EQ(ftruncate(mfd, n * psz), 0);
	a = mmap(NULL, n * psz, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
	b = mmap(NULL, n * psz, PROT_READ, MAP_SHARED, mfd, 0);
	ASSERT_TRUE(a != MAP_FAILED && b != MAP_FAILED);
	fill(a, n * psz, 7);
	fd = shim_attach(dev, getpid(), b, n * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, b, n, ent, NULL), 0);
	for (int i = 0; i < n; i++) {
		EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
		EXPECT_TRUE(!(ent[i] & SVM_SHIM_PAGE_WRITE)); /* PROT_READ */
	}
	ASSERT_EQ(shim_read(fd, b, n * psz, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, n * psz, 7, 0));
	/* Stores through the other mapping are visible (same pages). */
	a[10] = 0x11;
	ASSERT_EQ(shim_read(fd, b + 10, 1, buf, NULL), 0);
	EXPECT_EQ(buf[0], 0x11);
	/* Write fault on a read-only mapping fails like a CPU store. */
	ASSERT_ERRNO(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_WRITE, b, 1, ent, NULL),
		     EFAULT);
	/* Truncating the object zaps the mapping: an event, then -EFAULT. */
	ASSERT_EQ(ftruncate(mfd, 0), 0);
	{
		struct svm_shim_event ev[64];
		int k = shim_drain(fd, ev, 64);

		EXPECT_TRUE(covered(ev, k, -1, b, b + n * psz));
	}
	ASSERT_ERRNO(shim_read(fd, b, 1, buf, NULL), EFAULT);
	close(fd);
	close(dev);
}

static void file_backed(const char *dir, int shared)
{
	const int n = 32;
	char path[256];
	int dev = dev_or_skip(), ffd, fd;
	unsigned char *data = malloc(n * psz), *buf = malloc(n * psz), *m;
	uint64_t ent[32];

	snprintf(path, sizeof(path), "%s/svm_shim_file.XXXXXX", dir);
	ffd = mkstemp(path);
	if (ffd < 0)
		SKIP("cannot create a file in %s: %s", dir, strerror(errno));
	unlink(path);
	fill(data, n * psz, 99);
	ASSERT_EQ(write(ffd, data, n * psz), n * psz);
	m = mmap(NULL, n * psz, shared ? PROT_READ | PROT_WRITE : PROT_READ,
		 shared ? MAP_SHARED : MAP_PRIVATE, ffd, 0);
	ASSERT_TRUE(m != MAP_FAILED);
	fd = shim_attach(dev, getpid(), m, n * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, m, n * psz, buf, NULL), 0);
	ASSERT_EQ(memcmp(buf, data, n * psz), 0);
	ASSERT_EQ(shim_snapshot(fd, 0, m, n, ent, NULL), 0);
	for (int i = 0; i < n; i++)
		EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
	if (shared) {
		/* write(2) to the file shows through the mapping. */
		ASSERT_EQ(pwrite(ffd, "\x77", 1, 5 * psz + 3), 1);
		ASSERT_EQ(shim_read(fd, m + 5 * psz + 3, 1, buf, NULL), 0);
		EXPECT_EQ(buf[0], 0x77);
	}
	close(fd);
	close(dev);
	close(ffd);
}

TEST(file_private_disk)
{
	/* /var/tmp: the host's disk, seen through the guest's 9p root. */
	file_backed("/var/tmp", 0);
}

TEST(file_shared_tmpfs_dax_like)
{
	/* A shared mapping of a tmpfs file: the DAX-like case (no page cache
	 * copy between the file and the mapping).
	 */
	file_backed("/dev/shm", 1);
}

/* ------------------------------------------------------ THP and hugetlb */

static long smaps_field(void *addr, const char *field)
{
	char line[256], want[64];
	unsigned long lo, hi, a = (unsigned long)addr;
	int in = 0;
	long v = -1;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	snprintf(want, sizeof(want), "%s:", field);
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &lo, &hi) == 2 && strchr(line, '-') &&
		    line[0] != ' ' && !strncmp(line + strcspn(line, " "), " ", 1))
			in = a >= lo && a < hi;
		else if (in && !strncmp(line, want, strlen(want)))
			v = atol(line + strlen(want));
	}
	fclose(f);
	return v;
}

TEST(thp)
{
	const size_t huge = 2UL << 20, len = 2 * huge;
	int dev = dev_or_skip(), fd;
	unsigned char *raw, *p, *buf = malloc(len);
	uint64_t *ent = calloc(len / psz, sizeof(*ent));
	size_t np = len / psz;

	raw = mmap(NULL, len + huge, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ASSERT_TRUE(raw != MAP_FAILED);
	p = (unsigned char *)(((uintptr_t)raw + huge - 1) & ~(huge - 1));
	if (madvise(p, len, MADV_HUGEPAGE))
		SKIP("MADV_HUGEPAGE: %s", strerror(errno));
	fill(p, len, 3);
	if (smaps_field(p, "AnonHugePages") <= 0)
		SKIP("the kernel gave no transparent huge page");
	fd = shim_attach(dev, getpid(), p, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_snapshot(fd, 0, p, np, ent, NULL), 0);
	EXPECT_EQ((ent[0] & SVM_SHIM_PAGE_ORDER_MASK) >> SVM_SHIM_PAGE_ORDER_SHIFT, 9);
	EXPECT_TRUE(ent[0] & SVM_SHIM_PAGE_VALID);
	ASSERT_EQ(shim_read(fd, p, len, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, len, 3, 0));
	/* Splitting the huge mapping (partial DONTNEED) is an invalidation. */
	{
		struct svm_shim_event ev[64];
		int k;

		ASSERT_EQ(madvise(p + psz, psz, MADV_DONTNEED), 0);
		k = shim_drain(fd, ev, 64);
		EXPECT_TRUE(covered(ev, k, -1, p + psz, p + 2 * psz));
		ASSERT_EQ(shim_snapshot(fd, 0, p, 4, ent, NULL), 0);
		EXPECT_EQ(ent[1], 0);
		EXPECT_EQ((ent[0] & SVM_SHIM_PAGE_ORDER_MASK), 0);
	}
	close(fd);
	close(dev);
}

TEST(hugetlb)
{
	const size_t huge = 2UL << 20, len = 2 * huge;
	int dev = dev_or_skip(), fd;
	unsigned char *p, *buf = malloc(len);
	uint64_t *ent = calloc(len / psz, sizeof(*ent));

	p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
	if (p == MAP_FAILED)
		SKIP("no hugetlb pages reserved (/proc/sys/vm/nr_hugepages): %s",
		     strerror(errno));
	fill(p, len, 5);
	fd = shim_attach(dev, getpid(), p, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_snapshot(fd, 0, p, len / psz, ent, NULL), 0);
	for (size_t i = 0; i < len / psz; i++) {
		EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
		EXPECT_EQ((ent[i] & SVM_SHIM_PAGE_ORDER_MASK) >>
			  SVM_SHIM_PAGE_ORDER_SHIFT, 9);
	}
	ASSERT_EQ(shim_read(fd, p + 100, len - 200, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, len - 200, 5, 100));
	ASSERT_EQ(munmap(p + huge, huge), 0);
	{
		struct svm_shim_event ev[16];
		int k = shim_drain(fd, ev, 16);

		EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_UNMAP, p + huge, p + len));
	}
	ASSERT_ERRNO(shim_read(fd, p + huge, 1, buf, NULL), EFAULT);
	close(fd);
	close(dev);
}

/* ------------------------------------------ mapping changes and events */

TEST(event_munmap)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(16 * psz), buf[8], *big;
	struct svm_shim_event ev[16];
	uint64_t ent[16], seq;
	int k;

	ASSERT_TRUE(p);
	memset(p, 1, 16 * psz);
	fd = shim_attach(dev, getpid(), p, 16 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(munmap(p + 4 * psz, 2 * psz), 0);
	k = shim_drain(fd, ev, 16);
	ASSERT_EQ(k, 1);
	EXPECT_EQ(ev[0].kind, SVM_SHIM_EV_UNMAP);
	EXPECT_EQ(ev[0].start, (uintptr_t)(p + 4 * psz));
	EXPECT_EQ(ev[0].end, (uintptr_t)(p + 6 * psz));
	EXPECT_EQ(ev[0].seq, 1);
	/* Behave like a CPU access: the hole errors, the rest still works. */
	ASSERT_EQ(shim_snapshot(fd, 0, p, 16, ent, &seq), 0);
	EXPECT_EQ(seq, 1);
	EXPECT_EQ(ent[4], SVM_SHIM_PAGE_ERROR);
	EXPECT_EQ(ent[5], SVM_SHIM_PAGE_ERROR);
	EXPECT_TRUE(ent[3] & SVM_SHIM_PAGE_VALID);
	ASSERT_ERRNO(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, p, 16, ent, NULL),
		     EFAULT);
	ASSERT_ERRNO(shim_read(fd, p + 5 * psz, 1, buf, NULL), EFAULT);
	/*
	 * A read running into the hole may have copied the valid page before
	 * it: the destination must be large enough for the whole request.
	 */
	big = malloc(2 * psz);
	ASSERT_TRUE(big);
	ASSERT_ERRNO(shim_read(fd, p + 3 * psz, psz + 1, big, NULL), EFAULT);
	free(big);
	ASSERT_EQ(shim_read(fd, p + 6 * psz, 8, buf, NULL), 0);
	EXPECT_EQ(buf[0], 1);
	close(fd);
	close(dev);
}

TEST(event_madv_dontneed)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(8 * psz), buf[8];
	struct svm_shim_event ev[16];
	uint64_t ent[8];
	int k;

	ASSERT_TRUE(p);
	memset(p, 9, 8 * psz);
	fd = shim_attach(dev, getpid(), p, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(madvise(p + psz, 2 * psz, MADV_DONTNEED), 0);
	k = shim_drain(fd, ev, 16);
	ASSERT_EQ(k, 1);
	EXPECT_EQ(ev[0].kind, SVM_SHIM_EV_CLEAR);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_CLEAR, p + psz, p + 3 * psz));
	ASSERT_EQ(shim_snapshot(fd, 0, p, 8, ent, NULL), 0);
	EXPECT_EQ(ent[1], 0);
	EXPECT_EQ(ent[2], 0);
	EXPECT_TRUE(ent[0] & SVM_SHIM_PAGE_VALID);
	ASSERT_EQ(shim_read(fd, p + psz, 8, buf, NULL), 0);
	EXPECT_EQ(buf[0], 0);
	close(fd);
	close(dev);
}

TEST(event_mprotect)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(8 * psz), buf[8];
	struct svm_shim_event ev[16];
	uint64_t ent[8];
	int k;

	ASSERT_TRUE(p);
	memset(p, 4, 8 * psz);
	fd = shim_attach(dev, getpid(), p, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(mprotect(p + 2 * psz, psz, PROT_NONE), 0);
	k = shim_drain(fd, ev, 16);
	ASSERT_TRUE(k >= 1);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_PROTECTION, p + 2 * psz, p + 3 * psz));
	ASSERT_ERRNO(shim_read(fd, p + 2 * psz, 1, buf, NULL), EFAULT);
	ASSERT_ERRNO(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, p + 2 * psz, 1,
				   ent, NULL), EFAULT);
	ASSERT_EQ(shim_snapshot(fd, 0, p, 8, ent, NULL), 0);
	EXPECT_EQ(ent[2], SVM_SHIM_PAGE_ERROR);
	/* Read-only: readable, not writable, a write fault fails. */
	ASSERT_EQ(mprotect(p + 2 * psz, psz, PROT_READ), 0);
	ASSERT_EQ(shim_read(fd, p + 2 * psz, 1, buf, NULL), 0);
	EXPECT_EQ(buf[0], 4);
	ASSERT_EQ(mprotect(p + 3 * psz, psz, PROT_READ), 0);
	k = shim_drain(fd, ev, 16);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_PROTECTION, p + 3 * psz, p + 4 * psz));
	ASSERT_EQ(shim_snapshot(fd, 0, p + 3 * psz, 1, ent, NULL), 0);
	EXPECT_EQ(ent[0], SVM_SHIM_PAGE_VALID);
	ASSERT_ERRNO(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_WRITE, p + 3 * psz, 1,
				   ent, NULL), EFAULT);
	close(fd);
	close(dev);
}

TEST(event_order)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(16 * psz);
	struct svm_shim_event ev[16];
	uint64_t seq;
	int k;

	ASSERT_TRUE(p);
	memset(p, 1, 16 * psz);
	fd = shim_attach(dev, getpid(), p, 16 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(madvise(p, psz, MADV_DONTNEED), 0);
	ASSERT_EQ(mprotect(p + 4 * psz, psz, PROT_READ), 0);
	ASSERT_EQ(munmap(p + 8 * psz, psz), 0);
	k = shim_drain(fd, ev, 16);
	ASSERT_EQ(k, 3);
	EXPECT_TRUE(seqs_increasing(ev, k));
	EXPECT_EQ(ev[0].kind, SVM_SHIM_EV_CLEAR);
	EXPECT_EQ(ev[1].kind, SVM_SHIM_EV_PROTECTION);
	EXPECT_EQ(ev[2].kind, SVM_SHIM_EV_UNMAP);
	EXPECT_EQ(ev[2].start, (uintptr_t)(p + 8 * psz));
	/* A snapshot taken now is valid as of the newest event. */
	ASSERT_EQ(shim_snapshot(fd, 0, p, 1, (uint64_t[1]){0}, &seq), 0);
	EXPECT_EQ(seq, ev[2].seq);
	/* Changes outside the attached range produce nothing. */
	{
		unsigned char *q = map_anon(psz);

		q[0] = 1;
		ASSERT_EQ(madvise(q, psz, MADV_DONTNEED), 0);
		EXPECT_EQ(shim_drain(fd, ev, 16), 0);
	}
	close(fd);
	close(dev);
}

TEST(event_fork_cow)
{
	int dev = dev_or_skip(), fd, st;
	unsigned char *p = map_anon(8 * psz), buf[8];
	struct svm_shim_event ev[32];
	int k, go[2], done[2];
	char c;
	pid_t pid;

	ASSERT_TRUE(p);
	memset(p, 0x33, 8 * psz);
	fd = shim_attach(dev, getpid(), p, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(pipe(go), 0);
	ASSERT_EQ(pipe(done), 0);
	pid = fork();
	if (pid == 0) {
		/* The child's copy keeps the old data after the parent writes. */
		if (read(go[0], &c, 1) != 1)
			_exit(2);
		_exit(p[psz] == 0x33 ? 0 : 1);
	}
	/* fork write-protected the parent's private pages for COW. */
	k = shim_drain(fd, ev, 32);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_COW, p, p + 8 * psz));
	/* The first store breaks COW: the parent's page is replaced. */
	p[psz] = 0x44;
	k = shim_drain(fd, ev, 32);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_CLEAR, p + psz, p + 2 * psz));
	ASSERT_EQ(shim_read(fd, p + psz, 1, buf, NULL), 0);
	EXPECT_EQ(buf[0], 0x44);
	ASSERT_EQ(write(go[1], "g", 1), 1);
	ASSERT_EQ(waitpid(pid, &st, 0), pid);
	EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	close(fd);
	close(dev);
}

TEST(mremap_move)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(8 * psz), *q = map_anon(8 * psz), buf[8];
	struct svm_shim_event ev[16];
	uint64_t ent[8];
	void *r;
	int k;

	ASSERT_TRUE(p && q);
	memset(p, 0x21, 8 * psz);
	fd = shim_attach(dev, getpid(), p, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	r = mremap(p, 8 * psz, 8 * psz, MREMAP_MAYMOVE | MREMAP_FIXED, q);
	ASSERT_TRUE(r == q);
	k = shim_drain(fd, ev, 16);
	ASSERT_TRUE(k >= 1);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_UNMAP, p, p + 8 * psz));
	ASSERT_EQ(shim_snapshot(fd, 0, p, 8, ent, NULL), 0);
	for (int i = 0; i < 8; i++)
		EXPECT_EQ(ent[i], SVM_SHIM_PAGE_ERROR);
	ASSERT_ERRNO(shim_read(fd, p, 1, buf, NULL), EFAULT);
	/* The data moved with the mapping, which a new attach can see. */
	close(fd);
	fd = shim_attach(dev, getpid(), q, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, q + 7 * psz, 8, buf, NULL), 0);
	EXPECT_EQ(buf[7], 0x21);
	close(fd);
	close(dev);
}

TEST(event_migration)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(4 * psz), buf[8];
	struct svm_shim_event ev[16];
	void *pages[1];
	int nodes[1], status[1], k;
	long r;

	if (nr_numa_nodes() < 2)
		SKIP("needs 2 NUMA nodes, the guest has %d", nr_numa_nodes());
	ASSERT_TRUE(p);
	memset(p, 0x66, 4 * psz);
	pages[0] = p + psz;
	status[0] = -1;
	ASSERT_EQ(syscall(SYS_move_pages, 0, 1, pages, NULL, status, 0), 0);
	nodes[0] = status[0] == 0 ? 1 : 0;
	fd = shim_attach(dev, getpid(), p, 4 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	r = syscall(SYS_move_pages, 0, 1, pages, nodes, status, 0);
	if (r < 0 && errno == ENOSYS)
		SKIP("move_pages: ENOSYS");
	ASSERT_EQ(r, 0);
	ASSERT_EQ(status[0], nodes[0]);
	/* CPU page migration is reported by the kernel as a CLEAR. */
	k = shim_drain(fd, ev, 16);
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_CLEAR, p + psz, p + 2 * psz) ||
		    covered(ev, k, SVM_SHIM_EV_MIGRATE, p + psz, p + 2 * psz));
	ASSERT_EQ(shim_read(fd, p + psz, 8, buf, NULL), 0);
	EXPECT_EQ(buf[0], 0x66);
	close(fd);
	close(dev);
}

TEST(event_queue_overflow_collapses)
{
	const int n = 10, qlen = 4;
	int dev = dev_or_skip(), fd, k;
	unsigned char *p = map_anon(16 * psz);
	struct svm_shim_event ev[16];

	ASSERT_TRUE(p);
	memset(p, 1, 16 * psz);
	fd = shim_attach(dev, getpid(), p, 16 * psz, qlen);
	ASSERT_TRUE(fd >= 0);
	for (int i = 0; i < n; i++)
		ASSERT_EQ(madvise(p + i * psz, psz, MADV_DONTNEED), 0);
	k = shim_drain(fd, ev, 16);
	/* 4 fill the ring, the 5th collapses all, 6..8 append, the 9th
	 * collapses again, the 10th appends.
	 */
	ASSERT_EQ(k, 2);
	EXPECT_EQ(ev[0].kind, SVM_SHIM_EV_OVERFLOW);
	EXPECT_EQ(ev[0].start, (uintptr_t)p);
	EXPECT_EQ(ev[0].end, (uintptr_t)(p + 16 * psz));
	EXPECT_EQ(ev[0].seq, 9);
	EXPECT_EQ(ev[1].kind, SVM_SHIM_EV_CLEAR);
	EXPECT_EQ(ev[1].seq, 10);
	/* Nothing was lost: every zapped page is covered by some record. */
	for (int i = 0; i < n; i++)
		EXPECT_TRUE(covered(ev, k, -1, p + i * psz, p + (i + 1) * psz));
	close(fd);
	close(dev);
}

TEST(event_read_poll_semantics)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(4 * psz);
	struct svm_shim_event ev[2];
	struct pollfd pf;
	char small[8];

	ASSERT_TRUE(p);
	p[0] = 1;
	fd = shim_attach(dev, getpid(), p, 4 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	pf.fd = fd;
	pf.events = POLLIN;
	ASSERT_EQ(poll(&pf, 1, 0), 0);
	ASSERT_EQ(fcntl(fd, F_SETFL, O_NONBLOCK), 0);
	ASSERT_ERRNO(read(fd, ev, sizeof(ev)), EAGAIN);
	ASSERT_EQ(madvise(p, psz, MADV_DONTNEED), 0);
	ASSERT_EQ(poll(&pf, 1, 1000), 1);
	EXPECT_TRUE(pf.revents & POLLIN);
	/* Too small for one record. */
	ASSERT_ERRNO(read(fd, small, sizeof(small)), EINVAL);
	/* A bad buffer loses nothing: the record is still there. */
	ASSERT_ERRNO(syscall(SYS_read, fd, 8UL, sizeof(ev)), EFAULT);
	ASSERT_EQ(read(fd, ev, sizeof(ev)), sizeof(ev[0]));
	EXPECT_EQ(ev[0].seq, 1);
	ASSERT_EQ(poll(&pf, 1, 0), 0);
	close(fd);
	close(dev);
}

struct blocker {
	int fd;
	ssize_t got;
	struct svm_shim_event ev;
};

static void *blocking_reader(void *arg)
{
	struct blocker *b = arg;

	b->got = read(b->fd, &b->ev, sizeof(b->ev));
	return NULL;
}

TEST(event_blocking_read_wakes)
{
	int dev = dev_or_skip();
	unsigned char *p = map_anon(4 * psz);
	struct blocker b = { .got = -2 };
	pthread_t th;

	ASSERT_TRUE(p);
	p[0] = 1;
	b.fd = shim_attach(dev, getpid(), p, 4 * psz, 0);
	ASSERT_TRUE(b.fd >= 0);
	ASSERT_EQ(pthread_create(&th, NULL, blocking_reader, &b), 0);
	usleep(200 * 1000);
	EXPECT_EQ(b.got, -2); /* still blocked */
	ASSERT_EQ(munmap(p + psz, psz), 0);
	ASSERT_EQ(pthread_join(th, NULL), 0);
	ASSERT_EQ(b.got, sizeof(b.ev));
	EXPECT_EQ(b.ev.kind, SVM_SHIM_EV_UNMAP);
	close(b.fd);
	close(dev);
}

/* ---------------------------------------------------- target lifetime */

TEST(target_exit_while_attached)
{
	int dev = dev_or_skip(), fd, c2p[2], p2c[2], k;
	unsigned char *p = map_anon(8 * psz), buf[16];
	struct svm_shim_event ev[16];
	struct pollfd pf;
	uint64_t ent[8];
	pid_t pid;
	char c;

	ASSERT_TRUE(p);
	ASSERT_EQ(pipe(c2p), 0);
	ASSERT_EQ(pipe(p2c), 0);
	pid = fork();
	if (pid == 0) {
		memset(p, 0x7e, 8 * psz);
		if (write(c2p[1], "r", 1) != 1 || read(p2c[0], &c, 1) != 1)
			_exit(1);
		_exit(0);
	}
	ASSERT_EQ(read(c2p[0], &c, 1), 1);
	fd = shim_attach(dev, pid, p, 8 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, p, 16, buf, NULL), 0);
	EXPECT_EQ(buf[15], 0x7e);
	ASSERT_EQ(write(p2c[1], "x", 1), 1);
	ASSERT_EQ(waitpid(pid, NULL, 0), pid);
	/* The teardown was delivered, poll says hang-up, read drains then EOF. */
	pf.fd = fd;
	pf.events = POLLIN;
	ASSERT_EQ(poll(&pf, 1, 1000), 1);
	EXPECT_TRUE(pf.revents & POLLHUP);
	k = shim_drain(fd, ev, 16);
	/* exit_mmap() reports the release first, then unmaps. */
	EXPECT_TRUE(covered(ev, k, SVM_SHIM_EV_RELEASE, p, p + 8 * psz));
	EXPECT_TRUE(seqs_increasing(ev, k));
	ASSERT_EQ(read(fd, ev, sizeof(ev)), 0);
	ASSERT_ERRNO(shim_read(fd, p, 16, buf, NULL), ESRCH);
	ASSERT_ERRNO(shim_snapshot(fd, 0, p, 8, ent, NULL), ESRCH);
	close(fd);
	/* Attaching to the dead pid fails. */
	ASSERT_ERRNO(shim_attach(dev, pid, p, 8 * psz, 0), ESRCH);
	close(dev);
}

TEST(target_exits_holding_nothing)
{
	/* Several range fds on a process that dies; closing them afterwards
	 * in any order must be clean (checked by rmmod and dmesg at the end).
	 */
	int dev = dev_or_skip(), fds[4], go[2];
	unsigned char *p = map_anon(8 * psz);
	pid_t pid;
	char c;

	ASSERT_TRUE(p);
	ASSERT_EQ(pipe(go), 0);
	pid = fork();
	if (pid == 0) {
		p[0] = 1;
		if (read(go[0], &c, 1) != 1)
			_exit(1);
		_exit(0);
	}
	for (int i = 0; i < 4; i++) {
		fds[i] = shim_attach(dev, pid, p + i * psz, 2 * psz, 0);
		ASSERT_TRUE(fds[i] >= 0);
	}
	close(fds[1]);
	ASSERT_EQ(write(go[1], "x", 1), 1);
	ASSERT_EQ(waitpid(pid, NULL, 0), pid);
	close(fds[3]);
	close(fds[0]);
	close(fds[2]);
	close(dev);
}

/* --------------------------------------------------------------- races */

struct racer {
	unsigned char *p;
	size_t npages;
	volatile int stop;
	long remaps;
};

static void *remapper(void *arg)
{
	struct racer *r = arg;
	unsigned int gen = 1, seed = 1;

	/*
	 * CPU stores are not mapping changes, so a page is filled elsewhere
	 * and moved into place with mremap(): readers see the old page, a
	 * hole, or the new page, never a half-written one.
	 */
	while (!r->stop) {
		size_t i = rand_r(&seed) % r->npages;
		unsigned char *pg = r->p + i * psz, *st;

		if (rand_r(&seed) % 4 == 0) {
			if (munmap(pg, psz))
				abort();
			r->remaps++;
			continue;
		}
		st = mmap(NULL, psz, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (st == MAP_FAILED)
			abort();
		memset(st, (int)(gen++ & 0xff) | 1, psz);
		if (mremap(st, psz, psz, MREMAP_MAYMOVE | MREMAP_FIXED, pg) != pg)
			abort();
		r->remaps++;
	}
	return NULL;
}

TEST(race_munmap_vs_snapshot_and_read)
{
	const size_t n = 32;
	int dev = dev_or_skip(), fd;
	struct racer r = { .npages = n };
	unsigned char *buf = malloc(n * psz);
	uint64_t ent[32];
	long ok_reads = 0, efault = 0, ok_snaps = 0;
	time_t end;
	pthread_t th;

	r.p = map_anon(n * psz);
	ASSERT_TRUE(r.p);
	memset(r.p, 1, n * psz);
	fd = shim_attach(dev, getpid(), r.p, n * psz, 64);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(pthread_create(&th, NULL, remapper, &r), 0);
	end = time(NULL) + 4;
	for (unsigned int it = 0, seed = 7; time(NULL) < end; it++) {
		/* Windows of 1..4 pages: some land on holes, some do not. */
		size_t first = rand_r(&seed) % (n - 4), cnt = 1 + rand_r(&seed) % 4;
		int rc = shim_read(fd, r.p + first * psz, cnt * psz, buf, NULL);

		if (rc == 0) {
			ok_reads++;
			/* Page-atomic: each page is one generation. */
			for (size_t i = 0; i < cnt; i++) {
				unsigned char *pg = buf + i * psz;

				for (long j = 1; j < psz; j++)
					if (pg[j] != pg[0]) {
						r.stop = 1;
						ASSERT_TRUE(!"torn page");
					}
			}
		} else {
			ASSERT_TRUE(errno == EFAULT || errno == EBUSY);
			efault++;
		}
		rc = shim_snapshot(fd, (it & 1) ? SVM_SHIM_SNAP_FAULT_READ : 0,
				   r.p + first * psz, cnt, ent, NULL);
		if (rc == 0)
			ok_snaps++;
		else
			ASSERT_TRUE(errno == EFAULT || errno == EBUSY);
		{
			struct svm_shim_event ev[64];

			shim_drain(fd, ev, 64);
		}
	}
	r.stop = 1;
	pthread_join(th, NULL);
	printf("# %ld remaps, %ld reads ok, %ld failed like a CPU access, %ld snapshots\n",
	       r.remaps, ok_reads, efault, ok_snaps);
	EXPECT_TRUE(r.remaps > 0);
	EXPECT_TRUE(ok_snaps > 0);
	EXPECT_TRUE(ok_reads + efault > 0);
	close(fd);
	close(dev);
}

/* ------------------------------------------------------- permissions */

static int run_as(uid_t uid, int (*fn)(void *), void *arg)
{
	int st;
	pid_t pid = fork();

	if (pid == 0) {
		if (setresgid(uid, uid, uid) || setresuid(uid, uid, uid))
			_exit(100);
		_exit(fn(arg));
	}
	if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
		return -1;
	return WEXITSTATUS(st);
}

struct perm_arg {
	int dev;
	pid_t target;
	void *p;
};

static int try_attach(void *a)
{
	struct perm_arg *pa = a;
	int fd = shim_attach(pa->dev, pa->target ? pa->target : getpid(),
			     pa->p, psz, 0);

	if (fd >= 0)
		return 0;
	return errno == EPERM || errno == EACCES ? 1 : 2;
}

TEST(attach_needs_ptrace_rights)
{
	struct perm_arg pa;
	int go[2], st;
	pid_t root_target, nobody_target, nodump_target;
	char c;

	pa.dev = dev_or_skip();
	pa.p = map_anon(psz);
	ASSERT_TRUE(pa.p);
	ASSERT_EQ(pipe(go), 0);
	root_target = fork();
	if (root_target == 0) {
		close(go[1]);
		if (read(go[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	nobody_target = fork();
	if (nobody_target == 0) {
		close(go[1]);
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(1);
		/* A uid change makes a task non-dumpable; undo that. */
		prctl(PR_SET_DUMPABLE, 1);
		if (read(go[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	nodump_target = fork();
	if (nodump_target == 0) {
		close(go[1]);
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(1);
		prctl(PR_SET_DUMPABLE, 0);
		if (read(go[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	usleep(100 * 1000);
	/* An unprivileged caller may not attach to root's process... */
	pa.target = root_target;
	EXPECT_EQ(run_as(65534, try_attach, &pa), 1);
	/* ...nor to a process of another uid... */
	pa.target = nobody_target;
	EXPECT_EQ(run_as(65533, try_attach, &pa), 1);
	/* ...nor to a non-dumpable process of its own uid... */
	pa.target = nodump_target;
	EXPECT_EQ(run_as(65534, try_attach, &pa), 1);
	/* ...but may attach to its own uid's process and to itself. */
	pa.target = nobody_target;
	EXPECT_EQ(run_as(65534, try_attach, &pa), 0);
	pa.target = 0;
	EXPECT_EQ(run_as(65534, try_attach, &pa), 0);
	/* Root (CAP_SYS_PTRACE) may attach to all of them. */
	pa.target = nodump_target;
	EXPECT_EQ(try_attach(&pa), 0);
	close(go[1]);
	while (wait(&st) > 0)
		;
	close(pa.dev);
}

/* ------------------------------------------------------- bad arguments */

static int attach_raw(int dev, struct svm_shim_attach *a)
{
	return ioctl(dev, SVM_SHIM_IOC_ATTACH, a);
}

TEST(attach_rejects_bad_arguments)
{
	int dev = dev_or_skip();
	unsigned char *p = map_anon(4 * psz);
	struct svm_shim_attach a, good;
	struct svm_shim_query q = { 0 };

	ASSERT_TRUE(p);
	memset(&good, 0, sizeof(good));
	good.flags = SVM_SHIM_ATTACH_PID;
	good.target = getpid();
	good.start = (uintptr_t)p;
	good.length = 4 * psz;

#define BAD(field, val, err) do {					\
		a = good;						\
		a.field = (val);					\
		ASSERT_ERRNO(attach_raw(dev, &a), err);			\
	} while (0)
	BAD(start, (uintptr_t)p + 1, EINVAL);
	BAD(start, 0, EINVAL);
	BAD(length, 0, EINVAL);
	BAD(length, psz + 1, EINVAL);
	BAD(start, 0xfffffffffffff000ULL, EINVAL);   /* start + len wraps */
	BAD(length, 0xfffffffffffff000ULL, EINVAL);  /* wraps */
	BAD(start, 0x00fffffffffff000ULL, EINVAL);   /* beyond TASK_SIZE (la57 too) */
	BAD(start, 0xffff888000000000ULL, EINVAL);   /* kernel half */
	BAD(flags, 0, EINVAL);
	BAD(flags, SVM_SHIM_ATTACH_PID | SVM_SHIM_ATTACH_PIDFD, EINVAL);
	BAD(flags, SVM_SHIM_ATTACH_PID | (1ULL << 40), EINVAL);
	BAD(reserved[0], 1, EINVAL);
	BAD(reserved[1], 1ULL << 63, EINVAL);
	BAD(fd, 3, EINVAL);                          /* output must be zero */
	BAD(queue_len, SVM_SHIM_MAX_QUEUE_LEN + 1, EINVAL);
	BAD(target, 0, EINVAL);
	BAD(target, 1ULL << 40, EINVAL);
	BAD(target, 4194304 + 1, ESRCH);             /* beyond pid_max */
#undef BAD
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_ATTACH, (void *)16), EFAULT);
	/* pidfd attach is advertised by QUERY only where the kernel lets a
	 * module resolve pidfds; elsewhere it is refused, not half done.
	 */
	ASSERT_EQ(ioctl(dev, SVM_SHIM_IOC_QUERY, &q), 0);
	if (!(q.features & SVM_SHIM_FEAT_ATTACH_PIDFD)) {
		a = good;
		a.flags = SVM_SHIM_ATTACH_PIDFD;
		a.target = 0;
		ASSERT_ERRNO(attach_raw(dev, &a), EOPNOTSUPP);
	}
	/* The good one works and reports its fd. */
	a = good;
	{
		int fd = attach_raw(dev, &a);

		ASSERT_TRUE(fd >= 0);
		EXPECT_EQ(a.fd, fd);
		EXPECT_TRUE(fcntl(fd, F_GETFD) & FD_CLOEXEC);
		close(fd);
	}
	close(dev);
}

TEST(snapshot_and_read_reject_bad_arguments)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(8 * psz), buf[64];
	uint64_t ent[16];
	struct svm_shim_snapshot s, sg;
	struct svm_shim_read r, rg;

	ASSERT_TRUE(p);
	memset(p, 1, 8 * psz);
	/* Attach to the middle 4 pages only. */
	fd = shim_attach(dev, getpid(), p + 2 * psz, 4 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	memset(&sg, 0, sizeof(sg));
	sg.addr = (uintptr_t)(p + 2 * psz);
	sg.npages = 4;
	sg.entries = (uintptr_t)ent;
	ASSERT_EQ(ioctl(fd, SVM_SHIM_IOC_SNAPSHOT, &sg), 0);

#define BADS(field, val, err) do {					\
		s = sg;							\
		s.field = (val);					\
		ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_SNAPSHOT, &s), err);	\
	} while (0)
	BADS(addr, sg.addr + 1, EINVAL);
	BADS(npages, 0, EINVAL);
	BADS(npages, SVM_SHIM_MAX_SNAPSHOT_PAGES + 1, EINVAL);
	BADS(npages, 5, ERANGE);                      /* past the range */
	BADS(addr, (uintptr_t)p, ERANGE);             /* before the range */
	BADS(addr, 0xfffffffffffff000ULL, EINVAL);    /* addr + len wraps */
	BADS(flags, 1ULL << 5, EINVAL);
	BADS(flags, SVM_SHIM_SNAP_FAULT_READ | SVM_SHIM_SNAP_FAULT_WRITE, EINVAL);
	BADS(reserved[2], 1, EINVAL);
	BADS(entries, 0, EFAULT);
	BADS(entries, 0xffff888000000000ULL, EFAULT); /* a kernel address */
#undef BADS

	memset(&rg, 0, sizeof(rg));
	rg.addr = (uintptr_t)(p + 2 * psz + 5);
	rg.length = 10;
	rg.buf = (uintptr_t)buf;
	ASSERT_EQ(ioctl(fd, SVM_SHIM_IOC_READ, &rg), 0);
#define BADR(field, val, err) do {					\
		r = rg;							\
		r.field = (val);					\
		ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_READ, &r), err);	\
	} while (0)
	BADR(flags, 1, EINVAL);
	BADR(length, 0, EINVAL);
	BADR(length, SVM_SHIM_MAX_READ_BYTES + 1, EINVAL);
	BADR(length, 4 * psz, ERANGE);
	BADR(addr, (uintptr_t)(p + psz), ERANGE);
	BADR(addr, 0xffffffffffffffffULL, EINVAL);
	BADR(reserved[0], 7, EINVAL);
	BADR(buf, 0, EFAULT);
	BADR(buf, 0xffff888000000000ULL, EFAULT);
#undef BADR
	/* Unknown ioctls and ioctls on the wrong kind of fd. */
	ASSERT_ERRNO(ioctl(fd, _IOWR(SVM_SHIM_IOC_MAGIC, 0x3f, struct svm_shim_read), &rg),
		     ENOTTY);
	ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_ATTACH, &rg), ENOTTY);
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_SNAPSHOT, &sg), ENOTTY);
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_READ, &rg), ENOTTY);
	ASSERT_ERRNO(ioctl(dev, _IO('T', 0x01)), ENOTTY);
	/* Same number, wrong size: a different command. */
	ASSERT_ERRNO(ioctl(dev, _IOWR(SVM_SHIM_IOC_MAGIC, 0x00, uint64_t), buf), ENOTTY);
	/* Nothing of the above produced an event or a write to the buffer. */
	{
		struct svm_shim_event ev[4];

		EXPECT_EQ(shim_drain(fd, ev, 4), 0);
	}
	close(fd);
	close(dev);
}

TEST(read_large_window)
{
	const size_t len = SVM_SHIM_MAX_READ_BYTES;
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(len), *buf = malloc(len);
	struct iovec l, r;

	ASSERT_TRUE(p && buf);
	fill(p, len, 11);
	fd = shim_attach(dev, getpid(), p, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, p, len, buf, NULL), 0);
	ASSERT_EQ(memcmp(buf, p, len), 0);
	/* Same bytes as the kernel's own cross-process reader. */
	memset(buf, 0, len);
	l.iov_base = buf;
	l.iov_len = len;
	r.iov_base = p;
	r.iov_len = len;
	ASSERT_EQ(process_vm_readv(getpid(), &l, 1, &r, 1, 0), (ssize_t)len);
	ASSERT_EQ(memcmp(buf, p, len), 0);
	close(fd);
	close(dev);
}

/* ------------------------------------------- outputs only on success */

static int all_bytes(const void *p, size_t len, unsigned char v)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < len; i++)
		if (c[i] != v)
			return 0;
	return 1;
}

TEST(snapshot_writes_nothing_on_failure)
{
	int dev = dev_or_skip(), fd;
	unsigned char *p = map_anon(4 * psz);
	unsigned char *out = mmap(NULL, 2 * psz, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct svm_shim_snapshot *s;
	uint64_t *ent;

	ASSERT_TRUE(p && out != MAP_FAILED);
	memset(p, 1, 4 * psz);
	fd = shim_attach(dev, getpid(), p, 4 * psz, 0);
	ASSERT_TRUE(fd >= 0);

	/*
	 * Entries straddling a read-only page: the first two land on the
	 * writable page, the last two cannot be written. Nothing may be.
	 */
	memset(out, 0x5a, 2 * psz);
	ASSERT_EQ(mprotect(out + psz, psz, PROT_READ), 0);
	ent = (uint64_t *)(out + psz - 2 * sizeof(uint64_t));
	ASSERT_ERRNO(shim_snapshot(fd, 0, p, 4, ent, NULL), EFAULT);
	EXPECT_TRUE(all_bytes(out, 2 * psz, 0x5a));

	/* The struct itself read-only: entries must stay untouched too. */
	ASSERT_EQ(mprotect(out + psz, psz, PROT_READ | PROT_WRITE), 0);
	memset(out, 0x5a, 2 * psz);
	s = (struct svm_shim_snapshot *)(out + psz);
	memset(s, 0, sizeof(*s));
	s->addr = (uint64_t)(uintptr_t)p;
	s->npages = 4;
	s->entries = (uint64_t)(uintptr_t)out;
	s->seq = 0x77;
	ASSERT_EQ(mprotect(out + psz, psz, PROT_READ), 0);
	ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_SNAPSHOT, s), EFAULT);
	EXPECT_TRUE(all_bytes(out, psz, 0x5a));
	EXPECT_EQ(s->seq, 0x77);

	/* And with everything writable the same call works. */
	ASSERT_EQ(shim_snapshot(fd, 0, p, 4, (uint64_t *)out, NULL), 0);
	EXPECT_TRUE(((uint64_t *)out)[0] & SVM_SHIM_PAGE_VALID);
	close(fd);
	munmap(out, 2 * psz);
	munmap(p, 4 * psz);
	close(dev);
}

/* ------------------------------------------------ range fd capability */

static int range_info(int fd, struct svm_shim_range_info *ri)
{
	memset(ri, 0, sizeof(*ri));
	return ioctl(fd, SVM_SHIM_IOC_RANGE_INFO, ri);
}

TEST(range_info_names_the_attached_range)
{
	int dev = dev_or_skip(), fd, pfd[2], st;
	unsigned char *p = map_anon(4 * psz);
	struct svm_shim_range_info ri;
	struct svm_shim_query q = { 0 };
	pid_t child;
	char c;

	ASSERT_TRUE(p);
	ASSERT_EQ(ioctl(dev, SVM_SHIM_IOC_QUERY, &q), 0);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_RANGE_INFO);
	fd = shim_attach(dev, getpid(), p + psz, 2 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(range_info(fd, &ri), 0);
	EXPECT_EQ(ri.start, (uint64_t)(uintptr_t)(p + psz));
	EXPECT_EQ(ri.length, (uint64_t)(2 * psz));
	EXPECT_EQ(ri.pid, (uint64_t)getpid());
	memset(&ri, 0, sizeof(ri));
	ri.reserved[4] = 1;
	ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_RANGE_INFO, &ri), EINVAL);
	/* Only a range fd answers: not the device, not a pipe. */
	ASSERT_ERRNO(range_info(dev, &ri), ENOTTY);
	ASSERT_EQ(pipe(pfd), 0);
	ASSERT_ERRNO(range_info(pfd[0], &ri), ENOTTY);
	close(fd);

	/* A target that exited (and was reaped) reports pid 0. */
	child = fork();
	if (child == 0) {
		close(pfd[1]);
		if (read(pfd[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	close(pfd[0]);
	fd = shim_attach(dev, child, p, psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(range_info(fd, &ri), 0);
	EXPECT_EQ(ri.pid, (uint64_t)child);
	close(pfd[1]);
	ASSERT_EQ(waitpid(child, &st, 0), child);
	ASSERT_EQ(range_info(fd, &ri), 0);
	EXPECT_EQ(ri.pid, 0);
	EXPECT_EQ(ri.length, (uint64_t)psz);
	close(fd);
	munmap(p, 4 * psz);
	close(dev);
}

static int range_object(int fd, int object, uint64_t *offset)
{
	struct svm_shim_range_object ro;
	int ret;

	memset(&ro, 0, sizeof(ro));
	ro.fd = (uint64_t)object;
	ro.offset = 0xdead;
	ret = ioctl(fd, SVM_SHIM_IOC_RANGE_OBJECT, &ro);
	if (offset)
		*offset = ro.offset;
	return ret;
}

/*
 * svmd maps a deposited memfd only on the kernel's word that the range maps
 * it: the same inode, shared, readable, covering the range; else ENXIO.
 */
TEST(range_object_is_the_kernels_word_on_what_the_range_maps)
{
	int dev = dev_or_skip(), mfd, other, fd, pfd[2], st;
	struct svm_shim_range_object ro;
	struct svm_shim_query q = { 0 };
	unsigned char *p, *priv, *anon = map_anon(2 * psz);
	uint64_t off = 0;
	pid_t child;
	char c;

	ASSERT_EQ(ioctl(dev, SVM_SHIM_IOC_QUERY, &q), 0);
	EXPECT_TRUE(q.features & SVM_SHIM_FEAT_RANGE_OBJECT);
	mfd = memfd_create("svm_shim_object", MFD_CLOEXEC);
	other = memfd_create("svm_shim_other", MFD_CLOEXEC);
	ASSERT_TRUE(mfd >= 0 && other >= 0);
	ASSERT_EQ(ftruncate(mfd, 8 * psz), 0);
	ASSERT_EQ(ftruncate(other, 8 * psz), 0);
	/* Pages 2..5 of the object at p. */
	p = mmap(NULL, 4 * psz, PROT_READ, MAP_SHARED, mfd, 2 * psz);
	ASSERT_TRUE(p != MAP_FAILED);
	fd = shim_attach(dev, getpid(), p + psz, 2 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(range_object(fd, mfd, &off), 0);
	EXPECT_EQ(off, (uint64_t)(3 * psz));
	/* Another object, the device, a pipe: not what the range maps. */
	ASSERT_EQ(pipe(pfd), 0);
	ASSERT_ERRNO(range_object(fd, other, &off), ENXIO);
	EXPECT_EQ(off, 0xdead); /* outputs only on success */
	ASSERT_ERRNO(range_object(fd, dev, NULL), ENXIO);
	ASSERT_ERRNO(range_object(fd, pfd[0], NULL), ENXIO);
	ASSERT_ERRNO(range_object(fd, 1000000, NULL), EBADF);
	ASSERT_ERRNO(range_object(fd, -1, NULL), EINVAL);
	memset(&ro, 0, sizeof(ro));
	ro.fd = mfd;
	ro.reserved[5] = 1;
	ASSERT_ERRNO(ioctl(fd, SVM_SHIM_IOC_RANGE_OBJECT, &ro), EINVAL);
	ASSERT_ERRNO(ioctl(dev, SVM_SHIM_IOC_RANGE_OBJECT, &ro), ENOTTY);
	/* Remapped to another object, or unmapped: no longer. */
	ASSERT_TRUE(mmap(p, 4 * psz, PROT_READ, MAP_SHARED | MAP_FIXED, other, 0) == p);
	ASSERT_ERRNO(range_object(fd, mfd, NULL), ENXIO);
	ASSERT_EQ(range_object(fd, other, &off), 0);
	EXPECT_EQ(off, (uint64_t)psz);
	ASSERT_EQ(munmap(p, 4 * psz), 0);
	ASSERT_ERRNO(range_object(fd, other, NULL), ENXIO);
	close(fd);
	/* A mapping that ends inside the range. */
	p = mmap(NULL, 4 * psz, PROT_READ, MAP_SHARED, mfd, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	ASSERT_EQ(munmap(p + 2 * psz, 2 * psz), 0);
	fd = shim_attach(dev, getpid(), p, 4 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_ERRNO(range_object(fd, mfd, NULL), ENXIO);
	close(fd);
	munmap(p, 2 * psz);
	/* A private mapping of the object, and anonymous memory. */
	priv = mmap(NULL, 2 * psz, PROT_READ, MAP_PRIVATE, mfd, 0);
	ASSERT_TRUE(priv != MAP_FAILED);
	fd = shim_attach(dev, getpid(), priv, 2 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_ERRNO(range_object(fd, mfd, NULL), ENXIO);
	close(fd);
	munmap(priv, 2 * psz);
	fd = shim_attach(dev, getpid(), anon, 2 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_ERRNO(range_object(fd, mfd, NULL), ENXIO);
	close(fd);

	/* A target that exited: ESRCH. */
	child = fork();
	if (child == 0) {
		close(pfd[1]);
		if (read(pfd[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	close(pfd[0]);
	p = mmap(NULL, 2 * psz, PROT_READ, MAP_SHARED, mfd, 0);
	ASSERT_TRUE(p != MAP_FAILED);
	/* At offset 0 too. */
	fd = shim_attach(dev, getpid(), p, 2 * psz, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(range_object(fd, mfd, &off), 0);
	EXPECT_EQ(off, 0);
	close(fd);
	fd = shim_attach(dev, child, anon, psz, 0);
	ASSERT_TRUE(fd >= 0);
	close(pfd[1]);
	ASSERT_EQ(waitpid(child, &st, 0), child);
	ASSERT_ERRNO(range_object(fd, mfd, NULL), ESRCH);
	close(fd);
	munmap(p, 2 * psz);
	munmap(anon, 2 * psz);
	close(mfd);
	close(other);
	close(dev);
}

int main(int argc, char **argv)
{
	psz = sysconf(_SC_PAGESIZE);
	return sh_main(argc, argv);
}
