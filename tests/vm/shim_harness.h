/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A small kselftest-style fixture harness for the svm_shim VM tests.
 *
 * TEST(name) { ... } registers a test. Each test runs in its own forked
 * child with a time limit, so a crash or hang fails that test only.
 * ASSERT_* end the test on failure; EXPECT_* record the failure and go on.
 * SKIP(reason) ends the test as skipped. Output is TAP, and a closing line
 * "N passed, N failed, N skipped". Exit status 1 when any test failed.
 *
 * Usage: prog [-l] [-t NAME]...   (-l lists, -t runs only NAME)
 */
#ifndef SVM_SHIM_HARNESS_H
#define SVM_SHIM_HARNESS_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SH_MAX_TESTS 128
#define SH_TIMEOUT_S 60

struct sh_test {
	const char *name;
	void (*fn)(void);
};

static struct sh_test sh_tests[SH_MAX_TESTS];
static int sh_ntests;
static const char *sh_current;
static int sh_failed_expect;
/* Result pipe from the test child: 'P', 'F' or 'S' + reason. */
static int sh_result_fd = -1;

static void sh_register(const char *name, void (*fn)(void))
{
	if (sh_ntests < SH_MAX_TESTS) {
		sh_tests[sh_ntests].name = name;
		sh_tests[sh_ntests].fn = fn;
		sh_ntests++;
	}
}

#define TEST(name)							\
	static void sh_test_##name(void);				\
	__attribute__((constructor)) static void sh_reg_##name(void)	\
	{ sh_register(#name, sh_test_##name); }				\
	static void sh_test_##name(void)

static void sh_report(char kind, const char *fmt, ...)
{
	char buf[512];
	va_list ap;

	buf[0] = kind;
	va_start(ap, fmt);
	vsnprintf(buf + 1, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (write(sh_result_fd, buf, strlen(buf)) < 0)
		_exit(3);
}

#define SKIP(...) do {							\
		sh_report('S', __VA_ARGS__);				\
		_exit(0);						\
	} while (0)

#define SH_FAIL_AT(...) do {						\
		fprintf(stderr, "# %s:%d: ", __FILE__, __LINE__);	\
		fprintf(stderr, __VA_ARGS__);				\
		fprintf(stderr, "\n");					\
	} while (0)

#define ASSERT_TRUE(c) do { if (!(c)) {					\
		SH_FAIL_AT("ASSERT_TRUE(%s) failed (errno %d: %s)", #c,	\
			   errno, strerror(errno));			\
		sh_report('F', "%s", #c); _exit(1); } } while (0)
#define EXPECT_TRUE(c) do { if (!(c)) {					\
		SH_FAIL_AT("EXPECT_TRUE(%s) failed", #c);		\
		sh_failed_expect = 1; } } while (0)
#define ASSERT_EQ(a, b) do {						\
		long long _a = (long long)(a), _b = (long long)(b);	\
		if (_a != _b) {						\
			SH_FAIL_AT("ASSERT_EQ(%s, %s): %lld != %lld (errno %d: %s)", \
				   #a, #b, _a, _b, errno, strerror(errno)); \
			sh_report('F', "%s == %s", #a, #b); _exit(1); } \
	} while (0)
#define EXPECT_EQ(a, b) do {						\
		long long _a = (long long)(a), _b = (long long)(b);	\
		if (_a != _b) {						\
			SH_FAIL_AT("EXPECT_EQ(%s, %s): %lld != %lld", #a, #b, \
				   _a, _b);				\
			sh_failed_expect = 1; } } while (0)
#define ASSERT_NE(a, b) ASSERT_TRUE((a) != (b))
/* A call that must fail with errno e: returns -1 (libc) style. */
#define ASSERT_ERRNO(call, e) do {					\
		errno = 0;						\
		long _r = (long)(call);					\
		if (_r != -1 || errno != (e)) {				\
			SH_FAIL_AT("%s: want -1/%s, got %ld/%s", #call,	\
				   strerror(e), _r, strerror(errno));	\
			sh_report('F', "%s", #call); _exit(1); }	\
	} while (0)

static int sh_run_one(struct sh_test *t, int idx)
{
	int p[2], status = 0;
	char res[512] = "";
	ssize_t n;
	pid_t pid;
	time_t t0 = time(NULL);

	if (pipe(p))
		return -1;
	fflush(stdout);
	pid = fork();
	if (pid == 0) {
		close(p[0]);
		setpgid(0, 0);
		sh_result_fd = p[1];
		sh_current = t->name;
		alarm(SH_TIMEOUT_S);
		t->fn();
		if (sh_failed_expect)
			sh_report('F', "expectation failed");
		else
			sh_report('P', "");
		_exit(sh_failed_expect);
	}
	close(p[1]);
	/*
	 * The result may never come (crash, timeout) and the pipe may be
	 * held open by the test's own children: wait for the test process,
	 * then take whatever it wrote, then kill its leftovers.
	 */
	waitpid(pid, &status, 0);
	fcntl(p[0], F_SETFL, O_NONBLOCK);
	n = read(p[0], res, sizeof(res) - 1);
	if (n < 0)
		n = 0;
	res[n] = 0;
	close(p[0]);
	kill(-pid, SIGKILL);
	if (res[0] == 'S') {
		printf("ok %d %s # SKIP %s\n", idx, t->name, res + 1);
		return 2;
	}
	if (res[0] == 'P' && WIFEXITED(status) && WEXITSTATUS(status) == 0) {
		printf("ok %d %s # %lds\n", idx, t->name, (long)(time(NULL) - t0));
		return 0;
	}
	if (WIFSIGNALED(status))
		printf("# %s: killed by signal %d%s\n", t->name, WTERMSIG(status),
		       WTERMSIG(status) == SIGALRM ? " (timeout)" : "");
	printf("not ok %d %s%s%s\n", idx, t->name, res[0] ? " # " : "",
	       res[0] ? res + 1 : "");
	return 1;
}

static int sh_main(int argc, char **argv)
{
	int i, j, pass = 0, fail = 0, skip = 0, n = 0, sel = 0;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-l")) {
			for (j = 0; j < sh_ntests; j++)
				printf("%s\n", sh_tests[j].name);
			return 0;
		}
		if (!strcmp(argv[i], "-t") && i + 1 < argc)
			sel++, i++;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("TAP version 13\n");
	for (j = 0; j < sh_ntests; j++) {
		int want = !sel;

		for (i = 1; i < argc; i++)
			if (!strcmp(argv[i], "-t") && i + 1 < argc &&
			    !strcmp(argv[++i], sh_tests[j].name))
				want = 1;
		if (want)
			n++;
	}
	printf("1..%d\n", n);
	n = 0;
	for (j = 0; j < sh_ntests; j++) {
		int want = !sel, r;

		for (i = 1; i < argc; i++)
			if (!strcmp(argv[i], "-t") && i + 1 < argc &&
			    !strcmp(argv[++i], sh_tests[j].name))
				want = 1;
		if (!want)
			continue;
		r = sh_run_one(&sh_tests[j], ++n);
		if (r == 0)
			pass++;
		else if (r == 2)
			skip++;
		else
			fail++;
	}
	printf("%d passed, %d failed, %d skipped\n", pass, fail, skip);
	return fail ? 1 : 0;
}

#endif /* SVM_SHIM_HARNESS_H */
