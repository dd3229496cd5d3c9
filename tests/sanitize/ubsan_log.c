// Linked into every executable of the ASan + UBSan build (run-sanitized.sh
// asan): makes UBSan write its reports to $SVM_UBSAN_LOG_PATH.PID, as
// log_path does for ASan. gcc links the two runtimes as separate libraries
// (libasan.so.8, libubsan.so.1), each with its own report file, and
// libubsan's start-up applies UBSAN_OPTIONS' log_path through the exported
// __sanitizer_set_report_path, which resolves to libasan's copy: UBSan's
// own reports still went to stderr (seen with gcc 12: a shift exponent of
// 70 reported on stderr, no file). Calling libubsan's own copy, found by
// dlsym on its handle, sets the path of the file UBSan writes to.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

__attribute__((constructor)) static void svm_ubsan_log_path(void) {
  const char* path = getenv("SVM_UBSAN_LOG_PATH");
  if (path == NULL || *path == '\0') return;
  void* ubsan = dlopen("libubsan.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (ubsan == NULL) return;
  void (*set_path)(const char*) = (void (*)(const char*))dlsym(ubsan, "__sanitizer_set_report_path");
  if (set_path != NULL) set_path(path);
  dlclose(ubsan);
}
