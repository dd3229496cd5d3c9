/* The C API (svm/svm.h) used from C: compiled as C, so the header is
 * checked as C too. Called by c_api_test.cc with two running daemons. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "svm/svm.h"

#define PAGE 4096u
#define PAGES 16u

/* Returns 0, or the number of the step that failed (its error in err). */
int svm_c_flow(const char* target_a, const char* target_b, const char* peer_a, char* err, size_t errlen) {
  svm_client* a = NULL;
  svm_client* b = NULL;
  svm_watch_stream* w = NULL;
  svm_mapping* m = NULL;
  uint8_t* mem = NULL;
  uint8_t buf[PAGES * PAGE];
  int step = 0;
  int rc;
  uint64_t len = 0;
  svm_read_result res;
  svm_invalidation inv;

#define CHECK(n, cond)                                                         \
  do {                                                                         \
    step = (n);                                                                \
    if (!(cond)) {                                                             \
      snprintf(err, errlen, "step %d: %s (%s)", step, #cond, svm_last_error()); \
      goto out;                                                                \
    }                                                                          \
  } while (0)

  mem = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(1, mem != MAP_FAILED);
  memset(mem, 0x5a, PAGES * PAGE);
  CHECK(2, svm_connect(target_a, &a) == SVM_OK);
  CHECK(3, svm_connect(target_b, &b) == SVM_OK);
  CHECK(4, svm_export(a, "c", mem, PAGES * PAGE) == SVM_OK);
  CHECK(5, svm_import(b, peer_a, "c", NULL, &len) == SVM_OK && len == PAGES * PAGE);
  CHECK(6, svm_read(b, "c", 0, buf, sizeof(buf), 0, &res) == SVM_OK && res.len == sizeof(buf));
  CHECK(7, buf[0] == 0x5a && buf[sizeof(buf) - 1] == 0x5a);
  CHECK(8, svm_watch(b, "c", &w) == SVM_OK);
  /* A store, published by Sync: the importer drops page 3 and the watch
   * hears of it. */
  memset(mem + 3 * PAGE, 0x77, PAGE);
  CHECK(9, svm_sync(a, "c") == SVM_OK);
  CHECK(10, svm_watch_next(w, 5000, &inv) == SVM_OK);
  CHECK(11, inv.first_page <= 3 && inv.first_page + inv.npages > 3);
  CHECK(12, svm_map(b, "c", 4, &m) == SVM_OK && svm_mapping_size(m) == PAGES * PAGE);
  CHECK(13, svm_mapping_data(m)[3 * PAGE] == 0x77 && svm_mapping_data(m)[0] == 0x5a);
  CHECK(14, svm_mapping_prefetch(m, 0, PAGES * PAGE) == SVM_OK);
  CHECK(15, svm_read(b, "c", 3 * PAGE, buf, PAGE, SVM_READ_FRESH, &res) == SVM_OK && buf[0] == 0x77 &&
                res.pages_from_cache == 0);
  /* Errors: a code and a message. */
  rc = svm_read(b, "c", PAGES * PAGE, buf, PAGE, 0, NULL);
  CHECK(16, rc == SVM_OUT_OF_RANGE && strstr(svm_last_error(), "OUT_OF_RANGE") != NULL);
  CHECK(17, svm_read(b, "c", 0, buf, PAGE, 0x80, NULL) == SVM_INVALID_ARGUMENT);
  /* Nothing else is pending but page 3's store again: Sync and procfs's
   * periodic scrub may each have found it (two invalidations, both true). */
  while ((rc = svm_watch_next(w, 10, &inv)) == SVM_OK && inv.first_page <= 3 &&
         inv.first_page + inv.npages > 3) {
  }
  CHECK(18, rc == SVM_DEADLINE_EXCEEDED);
  CHECK(19, strcmp(svm_code_name(SVM_UNAVAILABLE), "UNAVAILABLE") == 0);
  CHECK(20, svm_unexport(a, "c") == SVM_OK);
  {
    /* An access list: these daemons run without TLS, so no peer proves an
     * identity and the listed export is refused to every peer. */
    const char* allow[] = {"node-z"};
    const char* bad[] = {"not an id"};
    CHECK(21, svm_export_allow(a, "c-bad", mem, PAGE, bad, 1) == SVM_INVALID_ARGUMENT);
    CHECK(22, svm_export_allow(a, "c-list", mem, PAGE, allow, 1) == SVM_OK);
    CHECK(23, svm_import(b, peer_a, "c-list", NULL, &len) == SVM_PERMISSION_DENIED);
  }
  step = 0;
out:
  svm_unmap(m);
  svm_watch_close(w);
  svm_disconnect(b);
  svm_disconnect(a);
  if (mem != NULL && mem != MAP_FAILED) munmap(mem, PAGES * PAGE);
  return step;
#undef CHECK
}
