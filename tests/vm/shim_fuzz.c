// SPDX-License-Identifier: GPL-2.0
/*
 * Bounded ioctl fuzz loop for svm_shim: random commands and arguments on
 * the device and on range fds, while another thread keeps changing the
 * mappings under them and children come and go. Fails (exit 1) when the
 * kernel answers with an errno the uapi does not allow, or a command that is
 * not ours does anything but -ENOTTY. Kernel-side problems are caught by
 * the caller scanning dmesg and unloading the module afterwards.
 *
 *   shim_fuzz [SECONDS] [SEED]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "shim_util.h"

#define NPAGES 64
#define MAXFD 16

static long psz;
static unsigned char *region;
static unsigned char *scratch;		/* the only buffer the kernel may fill */
static const size_t scratch_len = SVM_SHIM_MAX_READ_BYTES;
static volatile int stop;
static int fds[MAXFD];
static pid_t kids[4];
static uint64_t rng_state;
static long n_ops, n_ok, n_bad, n_attached, n_valid;
static double slowest_ms;
static unsigned int slowest_cmd;
static int slowest_errno;
static double op_ms[10];

static double mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t rnd(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static uint64_t pick_u64(void)
{
	static const uint64_t v[] = {
		0, 1, 2, 7, 4095, 4096, 4097, 65536, 65537, 1ULL << 20,
		16ULL << 20, (16ULL << 20) + 1, 0x7ffffffff000ULL,
		0x800000000000ULL, 0xffff888000000000ULL, ~0ULL, ~0ULL - 4095,
		1ULL << 63, 0xffffffffULL,
	};

	switch (rnd() % 4) {
	case 0:
		return v[rnd() % (sizeof(v) / sizeof(v[0]))];
	case 1:
		return rnd();
	case 2:
		return rnd() % 128;
	default:
		return (uintptr_t)region + (rnd() % (NPAGES + 8)) * psz -
		       4 * psz + (rnd() % 8 == 0 ? rnd() % psz : 0);
	}
}

static uint64_t pick_ptr(void)
{
	switch (rnd() % 6) {
	case 0:
		return 0;
	case 1:
		return 0xffff888000000000ULL;
	case 2:
		return (uintptr_t)region; /* may be unmapped or read-only */
	default:
		return (uintptr_t)scratch;
	}
}

static int errno_allowed(int e)
{
	switch (e) {
	case EINVAL: case EFAULT: case ERANGE: case ESRCH: case EPERM:
	case EACCES: case ENOTTY: case EBUSY: case ENOMEM: case EOPNOTSUPP:
	case EINTR: case EMFILE: case EAGAIN: case EBADF: case ENXIO:
		return 1;
	default:
		return 0;
	}
}

static void check(long r, const char *what, unsigned int cmd)
{
	n_ops++;
	if (r >= 0) {
		n_ok++;
		return;
	}
	if (!errno_allowed(errno)) {
		fprintf(stderr, "fuzz: %s cmd %#x: unexpected errno %d (%s)\n",
			what, cmd, errno, strerror(errno));
		n_bad++;
	}
}

static void *mutator(void *arg)
{
	(void)arg;
	while (!stop) {
		size_t i = rnd() % NPAGES, n = 1 + rnd() % 8;
		unsigned char *p = region + i * psz;

		if (i + n > NPAGES)
			n = NPAGES - i;
		switch (rnd() % 7) {
		case 0:
			munmap(p, n * psz);
			break;
		case 1:
			mmap(p, n * psz, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
			break;
		case 2:
			mprotect(p, n * psz, (int)(rnd() % 4));
			break;
		case 3:
			madvise(p, n * psz, MADV_DONTNEED);
			break;
		case 4:
			if (mprotect(p, psz, PROT_READ | PROT_WRITE) == 0)
				memset(p, (int)rnd(), psz);
			break;
		case 5:
			madvise(p, n * psz, rnd() % 2 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
			break;
		default:
			sched_yield();
		}
	}
	return NULL;
}

static void spawn_kid(int slot)
{
	pid_t pid = fork();

	if (pid == 0) {
		/* A target that maps, touches and dies at a random moment. */
		unsigned char *p = mmap(region, NPAGES * psz, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);

		if (p != MAP_FAILED)
			memset(p, 0x5a, NPAGES * psz);
		usleep((useconds_t)(rnd() % 200000));
		_exit(0);
	}
	kids[slot] = pid;
}

static void fuzz_ioctl(int fd, int is_dev)
{
	static const unsigned int cmds[] = {
		SVM_SHIM_IOC_QUERY, SVM_SHIM_IOC_ATTACH, SVM_SHIM_IOC_SNAPSHOT,
		SVM_SHIM_IOC_READ, SVM_SHIM_IOC_RANGE_INFO,
		SVM_SHIM_IOC_RANGE_OBJECT,
	};
	const int ncmds = (int)(sizeof(cmds) / sizeof(cmds[0]));
	uint64_t arg[8];
	unsigned int cmd;
	int ours = 0;
	long r;

	for (int i = 0; i < 8; i++)
		arg[i] = pick_u64();
	switch (rnd() % 4) {
	case 0:
		cmd = (unsigned int)rnd();
		break;
	case 1:
		cmd = _IOC((unsigned int)rnd() % 4, SVM_SHIM_IOC_MAGIC,
			   (unsigned int)rnd() % 8, (unsigned int)rnd() % 128);
		break;
	default:
		cmd = cmds[rnd() % ncmds];
		break;
	}
	for (int i = 0; i < ncmds; i++)
		ours |= cmd == cmds[i];
	if (cmd == SVM_SHIM_IOC_ATTACH) {
		arg[0] = rnd() % 8 ? SVM_SHIM_ATTACH_PID : pick_u64();
		arg[1] = rnd() % 3 ? (uint64_t)getpid() :
			 rnd() % 2 ? (uint64_t)kids[rnd() % 4] : pick_u64();
		if (rnd() % 2)
			arg[2] = (uintptr_t)region + (rnd() % NPAGES) * psz;
		if (rnd() % 2)
			arg[3] = (1 + rnd() % NPAGES) * psz;
		arg[4] = rnd() % 2 ? rnd() % 8 : pick_u64();
		arg[5] = rnd() % 8 ? 0 : pick_u64();
		arg[6] = rnd() % 8 ? 0 : pick_u64();
		arg[7] = rnd() % 8 ? 0 : pick_u64();
	} else if (cmd == SVM_SHIM_IOC_SNAPSHOT || cmd == SVM_SHIM_IOC_READ) {
		arg[0] = rnd() % 2 ? rnd() % 3 : pick_u64();
		if (rnd() % 2)
			arg[1] = (uintptr_t)region + (rnd() % NPAGES) * psz +
				 (cmd == SVM_SHIM_IOC_READ ? rnd() % psz : 0);
		if (rnd() % 2)
			arg[2] = 1 + rnd() % (cmd == SVM_SHIM_IOC_READ ? 3 * psz : 16);
		arg[3] = pick_ptr(); /* entries / buf: never our own data */
		arg[5] = rnd() % 8 ? 0 : pick_u64();
		arg[6] = rnd() % 8 ? 0 : pick_u64();
		arg[7] = rnd() % 8 ? 0 : pick_u64();
	} else if (cmd == SVM_SHIM_IOC_RANGE_INFO) {
		for (int i = 3; i < 8; i++)
			arg[i] = rnd() % 4 ? 0 : pick_u64();
	} else if (cmd == SVM_SHIM_IOC_RANGE_OBJECT) {
		arg[0] = rnd() % 4 ? rnd() % 16 : pick_u64(); /* an fd, or not */
		for (int i = 2; i < 8; i++)
			arg[i] = rnd() % 4 ? 0 : pick_u64();
	} else if (!ours) {
		/* Not ours: the kernel must not touch the buffer at all. */
	}
	errno = 0;
	double t0 = mono_ms();

	if (!ours && rnd() % 2)
		r = ioctl(fd, cmd, rnd() % 2 ? (void *)arg : (void *)pick_ptr());
	else
		r = ioctl(fd, cmd, arg);
	if (mono_ms() - t0 > slowest_ms) {
		slowest_ms = mono_ms() - t0;
		slowest_cmd = cmd;
		slowest_errno = r < 0 ? errno : 0;
	}
	if (!ours && r != -1) {
		fprintf(stderr, "fuzz: foreign cmd %#x succeeded on %s fd\n",
			cmd, is_dev ? "device" : "range");
		n_bad++;
	} else if (!ours && errno != ENOTTY && !(errno == EFAULT && 0)) {
		/* Generic VFS ioctls (FIONBIO, FIOCLEX...) may answer first. */
		if (_IOC_TYPE(cmd) == SVM_SHIM_IOC_MAGIC) {
			fprintf(stderr, "fuzz: our magic cmd %#x gave errno %d, not ENOTTY\n",
				cmd, errno);
			n_bad++;
		}
	}
	if (r >= 0 && ours)
		n_valid++;
	if (r >= 0 && cmd == SVM_SHIM_IOC_ATTACH) {
		n_attached++;
		int slot = (int)(rnd() % MAXFD);

		if (fds[slot] >= 0)
			close(fds[slot]);
		fds[slot] = (int)r;
	}
	check(r, is_dev ? "dev ioctl" : "range ioctl", cmd);
}

int main(int argc, char **argv)
{
	int secs = argc > 1 ? atoi(argv[1]) : 25, dev;
	time_t end;
	pthread_t th;

	rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) : (uint64_t)time(NULL) | 1;
	printf("fuzz: %d s, seed %#llx\n", secs, (unsigned long long)rng_state);
	psz = sysconf(_SC_PAGESIZE);
	signal(SIGPIPE, SIG_IGN);
	dev = shim_open();
	if (dev < 0) {
		perror("fuzz: open " SHIM_DEV);
		return 1;
	}
	region = mmap(NULL, NPAGES * psz, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	scratch = mmap(NULL, scratch_len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (region == MAP_FAILED || scratch == MAP_FAILED)
		return 1;
	/* Keep fork() cheap: children never touch the scratch buffer. */
	madvise(scratch, scratch_len, MADV_DONTFORK);
	for (int i = 0; i < MAXFD; i++)
		fds[i] = -1;
	for (int i = 0; i < 4; i++)
		spawn_kid(i);
	pthread_create(&th, NULL, mutator, NULL);

	end = time(NULL) + secs;
	while (time(NULL) < end) {
		int slot = (int)(rnd() % MAXFD), fd = fds[slot];
		int op = (int)(rnd() % 10);
		double t0 = mono_ms();
		pid_t w;

		/* Reap and respawn targets so some die while attached. */
		for (int i = 0; i < 4; i++) {
			w = waitpid(kids[i], NULL, WNOHANG);
			if (w == kids[i])
				spawn_kid(i);
		}
		if (op < 3 || fd < 0) {
			fuzz_ioctl(dev, 1);
		} else if (op < 6) {
			fuzz_ioctl(fd, 0);
		} else if (op == 6) {
			struct svm_shim_event ev[8];
			ssize_t r;

			fcntl(fd, F_SETFL, O_NONBLOCK);
			r = read(fd, rnd() % 8 ? (void *)ev : (void *)pick_ptr(),
				 rnd() % 2 ? sizeof(ev) : rnd() % 64);
			check(r, "read", 0);
		} else if (op == 7) {
			struct pollfd pf = { .fd = fd, .events = POLLIN };

			check(poll(&pf, 1, 0), "poll", 0);
		} else if (op == 8) {
			close(fd);
			fds[slot] = -1;
		} else if (rnd() % 8) {
			fuzz_ioctl(fd, 0);
		} else {
			/* A child inherits the range fds and exits at once. */
			pid_t pid = fork();

			if (pid == 0)
				_exit(0);
			waitpid(pid, NULL, 0);
		}
		op_ms[op] += mono_ms() - t0;
	}
	stop = 1;
	printf("fuzz: ms per op kind:");
	for (int i = 0; i < 10; i++)
		printf(" %d:%.0f", i, op_ms[i]);
	printf("\n");
	pthread_join(th, NULL);
	for (int i = 0; i < MAXFD; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	for (int i = 0; i < 4; i++) {
		kill(kids[i], SIGKILL);
		waitpid(kids[i], NULL, 0);
	}
	close(dev);
	printf("fuzz: %ld calls, %ld succeeded (%ld of our ioctls, %ld attaches), %ld unexpected answers\n",
	       n_ops, n_ok, n_valid, n_attached, n_bad);
	printf("fuzz: slowest ioctl %#x took %.1f ms (errno %d)\n", slowest_cmd,
	       slowest_ms, slowest_errno);
	/* A loop that never got past argument checking tested nothing. */
	if (!n_attached || n_valid < 100) {
		printf("fuzz: too few calls were accepted: the loop exercised nothing\n");
		return 1;
	}
	return n_bad ? 1 : 0;
}
