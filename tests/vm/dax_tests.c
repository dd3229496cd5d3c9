/* SPDX-License-Identifier: GPL-2.0 */
/*
 * svm_shim on real DAX (persistent memory emulated by the guest's
 * memmap= region): device-dax (/dev/daxX.Y, 2 MiB aligned) and fsdax (a
 * file on a filesystem mounted -o dax, mapped MAP_SHARED | MAP_SYNC).
 * The pages are ZONE_DEVICE pages, not page cache: the shim must report
 * them with their mapping order, read them consistently, and report the
 * invalidations the kernel raises when the device is unbound or the file
 * loses its blocks.
 *
 * Configuration from the environment (dax-guest.sh sets it; a test whose
 * mode is not configured skips, and the guest script refuses skips):
 *   SVM_DAX_DEV  /dev/daxX.Y of a devdax namespace (2 MiB alignment)
 *   SVM_DAX_DIR  a directory on a filesystem mounted with -o dax
 */
#define _GNU_SOURCE
#include <linux/falloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "shim_harness.h"
#include "shim_util.h"

#ifndef MAP_SYNC
#define MAP_SYNC 0x80000
#endif
#ifndef MAP_SHARED_VALIDATE
#define MAP_SHARED_VALIDATE 0x03
#endif

#define HUGE_SZ (2UL << 20)
#define MAXEV 1024

static long psz;

static int dev_or_skip(void)
{
	int dev = shim_open();

	if (dev < 0)
		SKIP("cannot open " SHIM_DEV ": %s", strerror(errno));
	return dev;
}

static const char *env_or_skip(const char *name)
{
	const char *v = getenv(name);

	if (!v || !*v)
		SKIP("%s is not set (mode not configured)", name);
	return v;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fill(void *p, size_t len, unsigned int seed)
{
	uint64_t *w = p;

	for (size_t i = 0; i < len / 8; i++)
		w[i] = ((uint64_t)seed << 40) ^ (i * 0x9E3779B97F4A7C15ULL);
}

static int check_fill(const void *p, size_t len, unsigned int seed, size_t off)
{
	const uint64_t *w = p;

	for (size_t i = 0; i < len / 8; i++)
		if (w[i] != (((uint64_t)seed << 40) ^
			     ((i + off / 8) * 0x9E3779B97F4A7C15ULL)))
			return 0;
	return 1;
}

static int covered(const struct svm_shim_event *ev, int n, const void *a,
		   const void *b)
{
	for (int i = 0; i < n; i++)
		if (ev[i].start <= (uint64_t)(uintptr_t)a &&
		    ev[i].end >= (uint64_t)(uintptr_t)b)
			return 1;
	return 0;
}

static unsigned int order_of(uint64_t e)
{
	return (unsigned int)((e & SVM_SHIM_PAGE_ORDER_MASK) >>
			      SVM_SHIM_PAGE_ORDER_SHIFT);
}

/* "dax0.0" for "/dev/dax0.0". */
static const char *dax_name(const char *dev)
{
	const char *s = strrchr(dev, '/');

	return s ? s + 1 : dev;
}

static int run(const char *fmt, const char *arg)
{
	char cmd[256];

	snprintf(cmd, sizeof(cmd), fmt, arg);
	return system(cmd);
}

/* ------------------------------------------------------------ device-dax */

/* Every page of a 2 MiB aligned device-dax mapping is valid with order 9
 * (PMD mappings: the device's alignment), writable where the mapping is,
 * and a read returns what the CPU stored, at any offset.
 */
TEST(devdax_snapshot_order_and_read)
{
	const char *path = env_or_skip("SVM_DAX_DEV");
	const size_t len = 4 * HUGE_SZ, np = len / psz;
	int dev = dev_or_skip(), dfd, fd;
	uint64_t *ent = calloc(np, sizeof(*ent)), seq = 0;
	unsigned char *m, *buf = malloc(len);

	dfd = open(path, O_RDWR | O_CLOEXEC);
	ASSERT_TRUE(dfd >= 0);
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
	ASSERT_TRUE(m != MAP_FAILED);
	EXPECT_EQ((uintptr_t)m % HUGE_SZ, 0);
	fill(m, len, 11);
	fd = shim_attach(dev, getpid(), m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, m, np, ent, &seq), 0);
	for (size_t i = 0; i < np; i++) {
		if (!(ent[i] & SVM_SHIM_PAGE_VALID) || order_of(ent[i]) != 9 ||
		    !(ent[i] & SVM_SHIM_PAGE_WRITE)) {
			fprintf(stderr, "# page %zu: entry 0x%llx\n", i,
				(unsigned long long)ent[i]);
			ASSERT_TRUE(0);
		}
	}
	ASSERT_EQ(shim_read(fd, m, len, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, len, 11, 0));
	/* Unaligned window across the 2 MiB boundary. */
	ASSERT_EQ(shim_read(fd, m + HUGE_SZ - 24, 48, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, 48, 11, HUGE_SZ - 24));
	/* A CPU store shows at once (the same device pages). */
	((uint64_t *)m)[1000] = 0x5A5A5A5A5A5A5A5AULL;
	ASSERT_EQ(shim_read(fd, m + 8000, 8, buf, NULL), 0);
	EXPECT_EQ(*(uint64_t *)buf, (long long)0x5A5A5A5A5A5A5A5AULL);
	close(fd);
	munmap(m, len);
	close(dfd);
	close(dev);
}

/* Unbinding the device (daxctl disable-device) while it is mapped and
 * attached behaves like it does for a CPU access: the kernel zaps every
 * mapping (an event covering the range), reads then fail with EFAULT, the
 * unbind does not wait for the shim (it holds no page or pgmap
 * reference), and the device comes back with enable-device.
 */
TEST(devdax_unbind_invalidates)
{
	const char *path = env_or_skip("SVM_DAX_DEV");
	const char *name = dax_name(path);
	const size_t len = 2 * HUGE_SZ, np = len / psz;
	int dev = dev_or_skip(), dfd, fd, k;
	uint64_t *ent = calloc(np, sizeof(*ent));
	unsigned char *m, *buf = malloc(len);
	struct svm_shim_event ev[64];
	double t0, took;

	dfd = open(path, O_RDWR | O_CLOEXEC);
	ASSERT_TRUE(dfd >= 0);
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
	ASSERT_TRUE(m != MAP_FAILED);
	fill(m, len, 12);
	fd = shim_attach(dev, getpid(), m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, m, len, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, len, 12, 0));
	EXPECT_EQ(shim_drain(fd, ev, 64), 0);

	t0 = now_s();
	ASSERT_EQ(run("daxctl disable-device %s >/dev/null 2>&1", name), 0);
	took = now_s() - t0;
	printf("# disable-device %s took %.2f s\n", name, took);
	EXPECT_TRUE(took < 10.0);
	k = shim_drain(fd, ev, 64);
	EXPECT_TRUE(covered(ev, k, m, m + len));
	ASSERT_ERRNO(shim_read(fd, m, psz, buf, NULL), EFAULT);
	ASSERT_EQ(shim_snapshot(fd, 0, m, np, ent, NULL), 0);
	for (size_t i = 0; i < np; i++)
		EXPECT_TRUE(!(ent[i] & SVM_SHIM_PAGE_VALID));
	close(fd);
	munmap(m, len);
	close(dfd);

	/* Back: a fresh open and mapping reads what the media kept. */
	ASSERT_EQ(run("daxctl enable-device %s >/dev/null 2>&1", name), 0);
	for (int i = 0; i < 100 && access(path, F_OK); i++)
		usleep(50000);
	dfd = open(path, O_RDWR | O_CLOEXEC);
	ASSERT_TRUE(dfd >= 0);
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
	ASSERT_TRUE(m != MAP_FAILED);
	fd = shim_attach(dev, getpid(), m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, m, len, buf, NULL), 0);
	EXPECT_TRUE(check_fill(buf, len, 12, 0));
	close(fd);
	munmap(m, len);
	close(dfd);
	close(dev);
}

/* ------------------------------------------------------------------ fsdax */

struct dax_file {
	int ffd;
	unsigned char *m;
	size_t len;
};

/* A file of len bytes (allocated blocks) on the dax mount, mapped with
 * MAP_SYNC (refused unless the mapping really is DAX) and filled.
 */
static void dax_file_open(struct dax_file *f, size_t len, unsigned int seed)
{
	const char *dir = env_or_skip("SVM_DAX_DIR");
	char path[256];

	snprintf(path, sizeof(path), "%s/svm_dax.XXXXXX", dir);
	f->ffd = mkstemp(path);
	ASSERT_TRUE(f->ffd >= 0);
	unlink(path);
	f->len = len;
	ASSERT_EQ(fallocate(f->ffd, 0, 0, (off_t)len), 0);
	f->m = mmap(NULL, len, PROT_READ | PROT_WRITE,
		    MAP_SHARED_VALIDATE | MAP_SYNC, f->ffd, 0);
	ASSERT_TRUE(f->m != MAP_FAILED);
	fill(f->m, len, seed);
}

/* Valid pages of order 0 or 9, a 9 only for a whole aligned 2 MiB block,
 * and reads equal to the CPU's view.
 */
TEST(fsdax_snapshot_order_and_read)
{
	const size_t len = 4 * HUGE_SZ, np = len / psz;
	int dev = dev_or_skip(), fd;
	uint64_t *ent = calloc(np, sizeof(*ent));
	unsigned char *buf = malloc(len);
	struct dax_file f;
	size_t pmd = 0;

	dax_file_open(&f, len, 21);
	fd = shim_attach(dev, getpid(), f.m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_snapshot(fd, SVM_SHIM_SNAP_FAULT_READ, f.m, np, ent, NULL), 0);
	for (size_t i = 0; i < np; i++) {
		unsigned int o = order_of(ent[i]);

		EXPECT_TRUE(ent[i] & SVM_SHIM_PAGE_VALID);
		EXPECT_TRUE(o == 0 || o == 9);
		if (o == 9) {
			const uintptr_t a = (uintptr_t)(f.m + i * psz);
			const size_t first = i - (a % HUGE_SZ) / psz;

			pmd++;
			EXPECT_TRUE((uintptr_t)(f.m + first * psz) >= (uintptr_t)f.m);
			EXPECT_TRUE(order_of(ent[first]) == 9);
		}
	}
	printf("# %zu of %zu pages reported in PMD mappings\n", pmd, np);
	/* dax-guest.sh makes ext4 with 2 MiB stripes, so fallocate gives
	 * aligned 2 MiB extents and the kernel maps them with PMDs.
	 */
	EXPECT_TRUE(pmd > 0);
	ASSERT_EQ(shim_read(fd, f.m, len, buf, NULL), 0);
	ASSERT_TRUE(check_fill(buf, len, 21, 0));
	/* pwrite goes to the same media the mapping shows. */
	ASSERT_EQ(pwrite(f.ffd, "\x77\x77\x77\x77\x77\x77\x77\x77", 8, 3 * psz), 8);
	ASSERT_EQ(shim_read(fd, f.m + 3 * psz, 8, buf, NULL), 0);
	EXPECT_EQ(*(uint64_t *)buf, (long long)0x7777777777777777ULL);
	close(fd);
	close(dev);
}

/* Truncating the file takes its blocks away from the mapping: an event
 * covering the lost part, reads there fail (SIGBUS for a CPU), the rest
 * still reads.
 */
TEST(fsdax_truncate_invalidates)
{
	const size_t len = 2 * HUGE_SZ;
	int dev = dev_or_skip(), fd, k;
	unsigned char *buf = malloc(len);
	struct svm_shim_event ev[MAXEV];
	struct dax_file f;

	dax_file_open(&f, len, 22);
	fd = shim_attach(dev, getpid(), f.m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, f.m, len, buf, NULL), 0);
	shim_drain(fd, ev, MAXEV);
	ASSERT_EQ(ftruncate(f.ffd, (off_t)HUGE_SZ), 0);
	k = shim_drain(fd, ev, MAXEV);
	EXPECT_TRUE(covered(ev, k, f.m + HUGE_SZ, f.m + len));
	ASSERT_ERRNO(shim_read(fd, f.m + HUGE_SZ, psz, buf, NULL), EFAULT);
	ASSERT_EQ(shim_read(fd, f.m, HUGE_SZ, buf, NULL), 0);
	EXPECT_TRUE(check_fill(buf, HUGE_SZ, 22, 0));
	close(fd);
	close(dev);
}

/* Punching a hole frees the blocks under the mapping: an event covering
 * the hole; the hole then reads as zeros (a hole in a file), never as the
 * freed blocks' old content.
 */
TEST(fsdax_punch_hole_invalidates)
{
	const size_t len = 2 * HUGE_SZ;
	int dev = dev_or_skip(), fd, k;
	unsigned char *buf = malloc(len), *zero = calloc(1, 8 * psz);
	struct svm_shim_event ev[MAXEV];
	struct dax_file f;

	dax_file_open(&f, len, 23);
	fd = shim_attach(dev, getpid(), f.m, len, 0);
	ASSERT_TRUE(fd >= 0);
	ASSERT_EQ(shim_read(fd, f.m, len, buf, NULL), 0);
	shim_drain(fd, ev, MAXEV);
	ASSERT_EQ(fallocate(f.ffd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			    (off_t)(16 * psz), (off_t)(8 * psz)), 0);
	k = shim_drain(fd, ev, MAXEV);
	EXPECT_TRUE(covered(ev, k, f.m + 16 * psz, f.m + 24 * psz));
	ASSERT_EQ(shim_read(fd, f.m + 16 * psz, 8 * psz, buf, NULL), 0);
	EXPECT_EQ(memcmp(buf, zero, 8 * psz), 0);
	ASSERT_EQ(shim_read(fd, f.m, 16 * psz, buf, NULL), 0);
	EXPECT_TRUE(check_fill(buf, 16 * psz, 23, 0));
	close(fd);
	close(dev);
}

int main(int argc, char **argv)
{
	psz = sysconf(_SC_PAGESIZE);
	return sh_main(argc, argv);
}
