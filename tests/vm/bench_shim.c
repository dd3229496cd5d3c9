// SPDX-License-Identifier: GPL-2.0
/*
 * svm_shim benchmark (not a test), perftest-style output. Every figure is
 * compared with the kernel's own interface for the same job, measured in
 * the same run on the same target range:
 *   - snapshot (page state of N pages) vs pread() of /proc/PID/pagemap;
 *   - consistent read of N bytes vs process_vm_readv().
 * The target is a child process holding a populated anonymous range.
 *
 *   bench_shim [--mib N] [--json]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shim_util.h"

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

struct stats {
	double min, typical, p99;
};

static struct stats summarize(double *t, int n)
{
	struct stats s;

	qsort(t, n, sizeof(*t), cmp_double);
	s.min = t[0];
	s.typical = t[n / 2];
	s.p99 = t[(int)(n * 0.99) < n ? (int)(n * 0.99) : n - 1];
	return s;
}

static int iters_for(size_t bytes)
{
	if (bytes <= 64 * 1024)
		return 400;
	if (bytes <= 1 << 20)
		return 100;
	return 20;
}

int main(int argc, char **argv)
{
	size_t mib = 64, len, npages;
	long psz = sysconf(_SC_PAGESIZE);
	int json = 0, dev, fd, pm, go[2], ready[2];
	unsigned char *p, *buf;
	uint64_t *ent, *pmbuf;
	double *t, *tr;
	char path[64], c;
	pid_t pid;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--mib") && i + 1 < argc)
			mib = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--json"))
			json = 1;
	}
	len = mib << 20;
	npages = len / psz;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0);
	if (p == MAP_FAILED || pipe(go) || pipe(ready))
		return 1;
	madvise(p, len, MADV_NOHUGEPAGE); /* 4 KiB mappings: the common case */
	pid = fork();
	if (pid == 0) {
		for (size_t i = 0; i < len; i += psz)
			p[i] = (unsigned char)(i / psz);
		if (write(ready[1], "r", 1) != 1 || read(go[0], &c, 1) < 0)
			_exit(1);
		_exit(0);
	}
	if (read(ready[0], &c, 1) != 1)
		return 1;

	dev = shim_open();
	if (dev < 0) {
		perror("bench: open " SHIM_DEV);
		return 1;
	}
	fd = shim_attach(dev, pid, p, len, 0);
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	pm = open(path, O_RDONLY);
	if (fd < 0 || pm < 0) {
		perror("bench: attach or pagemap");
		return 1;
	}
	buf = malloc(SVM_SHIM_MAX_READ_BYTES);
	ent = malloc(SVM_SHIM_MAX_SNAPSHOT_PAGES * sizeof(*ent));
	pmbuf = malloc(SVM_SHIM_MAX_SNAPSHOT_PAGES * sizeof(*pmbuf));
	t = malloc(1000 * sizeof(*t));
	tr = malloc(1000 * sizeof(*tr));

	if (!json) {
		printf("# svm_shim benchmark: target pid %d, %zu MiB populated anonymous memory, page %ld B\n",
		       pid, mib, psz);
		printf("# snapshot: SVM_SHIM_IOC_SNAPSHOT (no fault) vs pread(/proc/PID/pagemap), same pages\n");
		printf("%-8s %-12s %-22s %-25s %-22s %-25s %s\n", "#pages",
		       "#iterations", "shim_t_typical[usec]", "pagemap_t_typical[usec]",
		       "shim_rate[Mpages/s]", "pagemap_rate[Mpages/s]", "ratio");
	} else {
		printf("{\"target_mib\": %zu, \"snapshot\": [", mib);
	}
	{
		static const size_t sizes[] = { 1, 64, 1024, 16384, 65536 };
		int first = 1;

		for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
			size_t n = sizes[si];
			int it = iters_for(n * psz), warm = it / 10 + 1;
			struct stats a, b;

			if (n > npages || n > SVM_SHIM_MAX_SNAPSHOT_PAGES)
				continue;
			for (int i = -warm; i < it; i++) {
				size_t off = ((size_t)(i + warm) * 7919 % (npages - n + 1));
				double t0 = now_us();

				if (shim_snapshot(fd, 0, p + off * psz, n, ent, NULL))
					return perror("snapshot"), 1;
				double t1 = now_us();

				if (pread(pm, pmbuf, n * 8, (off_t)((uintptr_t)p / psz + off) * 8) !=
				    (ssize_t)(n * 8))
					return perror("pagemap"), 1;
				double t2 = now_us();

				if (i >= 0) {
					t[i] = t1 - t0;
					tr[i] = t2 - t1;
				}
			}
			a = summarize(t, it);
			b = summarize(tr, it);
			if (json)
				printf("%s{\"pages\": %zu, \"iterations\": %d, \"shim_t_typical_usec\": %.2f, \"pagemap_t_typical_usec\": %.2f, \"ratio\": %.3f}",
				       first ? "" : ", ", n, it, a.typical, b.typical,
				       b.typical / a.typical);
			else
				printf("%-8zu %-12d %-22.2f %-25.2f %-22.3f %-25.3f %.2f\n",
				       n, it, a.typical, b.typical, n / a.typical,
				       n / b.typical, b.typical / a.typical);
			first = 0;
		}
	}
	if (!json) {
		printf("# read: SVM_SHIM_IOC_READ vs process_vm_readv, same bytes (ratio = shim BW / process_vm_readv BW)\n");
		printf("%-10s %-12s %-18s %-22s %-18s %-22s %-25s %s\n", "#bytes",
		       "#iterations", "t_min[usec]", "t_typical[usec]",
		       "99%[usec]", "BW_typical[MB/s]", "pvr_BW_typical[MB/s]",
		       "ratio");
	} else {
		printf("], \"read\": [");
	}
	{
		static const size_t sizes[] = { 4096, 65536, 1 << 20, 16 << 20 };
		int first = 1;

		for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
			size_t n = sizes[si];
			int it = iters_for(n), warm = it / 10 + 1;
			struct stats a, b;

			if (n > len)
				continue;
			for (int i = -warm; i < it; i++) {
				size_t off = ((size_t)(i + warm) * 7919 % ((len - n) / psz + 1)) * psz;
				struct iovec l = { buf, n }, r = { p + off, n };
				double t0 = now_us();

				if (shim_read(fd, p + off, n, buf, NULL))
					return perror("shim read"), 1;
				double t1 = now_us();

				if (process_vm_readv(pid, &l, 1, &r, 1, 0) != (ssize_t)n)
					return perror("process_vm_readv"), 1;
				double t2 = now_us();

				if (i >= 0) {
					t[i] = t1 - t0;
					tr[i] = t2 - t1;
				}
			}
			a = summarize(t, it);
			b = summarize(tr, it);
			if (json)
				printf("%s{\"bytes\": %zu, \"iterations\": %d, \"t_typical_usec\": %.2f, \"pvr_t_typical_usec\": %.2f, \"ratio\": %.3f}",
				       first ? "" : ", ", n, it, a.typical, b.typical,
				       b.typical / a.typical);
			else
				printf("%-10zu %-12d %-18.2f %-22.2f %-18.2f %-22.1f %-25.1f %.2f\n",
				       n, it, a.min, a.typical, a.p99, n / a.typical,
				       n / b.typical, b.typical / a.typical);
			first = 0;
		}
	}
	if (json)
		printf("]}\n");
	close(fd);
	close(dev);
	if (write(go[1], "x", 1) != 1)
		kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return 0;
}
