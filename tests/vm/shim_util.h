/* SPDX-License-Identifier: GPL-2.0 */
/* Thin wrappers around the svm_shim uapi for the VM tests and benchmark. */
#ifndef SVM_SHIM_UTIL_H
#define SVM_SHIM_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <linux/svm_shim.h>

#define SHIM_DEV "/dev/svm_shim"

static inline int shim_open(void)
{
	return open(SHIM_DEV, O_RDWR | O_CLOEXEC);
}

/* Returns the range fd, or -1 with errno. */
static inline int shim_attach(int dev, pid_t pid, void *start, size_t len,
			      uint64_t qlen)
{
	struct svm_shim_attach a;

	memset(&a, 0, sizeof(a));
	a.flags = SVM_SHIM_ATTACH_PID;
	a.target = (uint64_t)pid;
	a.start = (uint64_t)(uintptr_t)start;
	a.length = len;
	a.queue_len = qlen;
	return ioctl(dev, SVM_SHIM_IOC_ATTACH, &a);
}

/* Returns 0, or -1 with errno. */
static inline int shim_snapshot(int fd, uint64_t flags, void *addr,
				uint64_t npages, uint64_t *entries,
				uint64_t *seq)
{
	struct svm_shim_snapshot s;
	int r;

	memset(&s, 0, sizeof(s));
	s.flags = flags;
	s.addr = (uint64_t)(uintptr_t)addr;
	s.npages = npages;
	s.entries = (uint64_t)(uintptr_t)entries;
	r = ioctl(fd, SVM_SHIM_IOC_SNAPSHOT, &s);
	if (!r && seq)
		*seq = s.seq;
	return r;
}

static inline int shim_read(int fd, const void *addr, size_t len, void *buf,
			    uint64_t *seq)
{
	struct svm_shim_read rd;
	int r;

	memset(&rd, 0, sizeof(rd));
	rd.addr = (uint64_t)(uintptr_t)addr;
	rd.length = len;
	rd.buf = (uint64_t)(uintptr_t)buf;
	r = ioctl(fd, SVM_SHIM_IOC_READ, &rd);
	if (!r && seq)
		*seq = rd.seq;
	return r;
}

/* Drain queued events without blocking; returns how many were stored. */
static inline int shim_drain(int fd, struct svm_shim_event *ev, int max)
{
	int fl = fcntl(fd, F_GETFL), n = 0;

	fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	while (n < max) {
		ssize_t r = read(fd, ev + n, (size_t)(max - n) * sizeof(*ev));

		if (r <= 0)
			break;
		n += (int)(r / (ssize_t)sizeof(*ev));
	}
	fcntl(fd, F_SETFL, fl);
	return n;
}

#endif /* SVM_SHIM_UTIL_H */
