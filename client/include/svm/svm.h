/* libsvm's C API: a C (and FFI) face of the C++ client in svm/client.h,
 * with the same behaviour: connect to svmd, export memory, import a peer's
 * export, read it (cached pages are copied in this process, the rest
 * travel through the session's rings), map it read-only, watch its
 * invalidations, Sync.
 *
 * Errors: every function that can fail returns an svm_code, 0 on success;
 * svm_last_error() then describes the failure of the calling thread's last
 * failed call. Objects are not shared between threads unless said so:
 * an svm_client may be used by several threads at once (as svm::Client);
 * a mapping or a watch by one at a time.
 *
 * Link with libsvm (pkg-config --static --libs svm, or CMake svm::svm) and
 * a C++ linker (libsvm is written in C++). */
#ifndef SVM_SVM_H_
#define SVM_SVM_H_

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The codes of absl::Status / gRPC, same numbers. */
typedef enum svm_code {
  SVM_OK = 0,
  SVM_CANCELLED = 1,
  SVM_UNKNOWN = 2,
  SVM_INVALID_ARGUMENT = 3,
  SVM_DEADLINE_EXCEEDED = 4,
  SVM_NOT_FOUND = 5,
  SVM_ALREADY_EXISTS = 6,
  SVM_PERMISSION_DENIED = 7,
  SVM_RESOURCE_EXHAUSTED = 8,
  SVM_FAILED_PRECONDITION = 9,
  SVM_ABORTED = 10,
  SVM_OUT_OF_RANGE = 11,
  SVM_UNIMPLEMENTED = 12,
  SVM_INTERNAL = 13,
  SVM_UNAVAILABLE = 14,
  SVM_DATA_LOSS = 15,
  SVM_UNAUTHENTICATED = 16
} svm_code;

typedef struct svm_client svm_client;
typedef struct svm_mapping svm_mapping;
typedef struct svm_watch_stream svm_watch_stream;

/* The calling thread's last error: "CODE: message"; "" when none. Valid
 * until the thread's next failing call. */
const char* svm_last_error(void);
/* The name of a code ("UNAVAILABLE"). */
const char* svm_code_name(int code);

/* target: "unix:/run/svm/svmd.sock". */
int svm_connect(const char* target, svm_client** out);
/* Destroy every mapping and watch of the client first. NULL is ignored. */
void svm_disconnect(svm_client* c);

/* Exports [addr, addr + len) of this process as name. */
int svm_export(svm_client* c, const char* name, const void* addr, size_t len);
/* Exports memory of another process (the caller must be allowed to ptrace it). */
int svm_export_pid(svm_client* c, const char* name, pid_t pid, uint64_t addr, uint64_t len);
/* svm_export with an access list: only peers whose TLS certificate names one
 * of the nallow identities in allow (a DNS or URI subject alternative name,
 * or the common name) may import it; others get SVM_PERMISSION_DENIED and
 * learn nothing of it. nallow 0: every authenticated peer. */
int svm_export_allow(svm_client* c, const char* name, const void* addr, size_t len,
                     const char* const* allow, size_t nallow);
int svm_unexport(svm_client* c, const char* name);
/* Imports export name of the daemon at peer ("HOST:PORT") as as_name
 * (NULL or "": name). *len_out (may be NULL) receives its length. */
int svm_import(svm_client* c, const char* peer, const char* name, const char* as_name,
               uint64_t* len_out);

#define SVM_READ_FRESH 1u /* bypass the importer's cache (neither use nor fill it) */

typedef struct svm_read_result {
  uint64_t len;
  uint64_t seq; /* the exporter's invalidation sequence the data is valid for */
  uint64_t pages_from_cache;
  uint64_t pages_fetched;
} svm_read_result;

/* Reads len bytes at offset of an import (or a local export) into dst.
 * flags: 0 or SVM_READ_FRESH. result may be NULL. */
int svm_read(svm_client* c, const char* name, uint64_t offset, void* dst, size_t len, unsigned flags,
             svm_read_result* result);

/* Maps import name read-only into this process (svm/client.h: Mapping):
 * a missing page faults to svmd; a page that cannot be had raises SIGBUS.
 * readahead_pages: pages fetched per sequential fault beyond the one
 * touched (16 is libsvm's default). */
int svm_map(svm_client* c, const char* name, size_t readahead_pages, svm_mapping** out);
const uint8_t* svm_mapping_data(const svm_mapping* m);
size_t svm_mapping_size(const svm_mapping* m);
/* Faults [offset, offset + len) in ahead of use, in one batch. */
int svm_mapping_prefetch(svm_mapping* m, uint64_t offset, uint64_t len);
void svm_unmap(svm_mapping* m); /* NULL is ignored */

typedef struct svm_invalidation {
  uint64_t first_page;
  uint64_t npages;
  uint64_t seq;
  uint32_t kind; /* svm.v1.InvalidationKind */
  uint32_t reserved;
  uint64_t detected_ns; /* CLOCK_MONOTONIC on the exporter's node */
  uint64_t received_ns; /* CLOCK_MONOTONIC on this node */
} svm_invalidation;

/* Every invalidation of name after svm_watch returned, in order. */
int svm_watch(svm_client* c, const char* name, svm_watch_stream** out);
/* The next one; SVM_DEADLINE_EXCEEDED when none came within timeout_ms. */
int svm_watch_next(svm_watch_stream* w, int64_t timeout_ms, svm_invalidation* out);
void svm_watch_close(svm_watch_stream* w); /* NULL is ignored */

/* Returns when every importer dropped the pages this process wrote since
 * the last Sync (release consistency; svm/client.h). */
int svm_sync(svm_client* c, const char* name);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* SVM_SVM_H_ */
