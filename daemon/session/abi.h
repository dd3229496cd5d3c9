// The client data plane's contract between libsvm and svmd: the layout of a
// session's shared memory (submission and completion rings, the data area),
// the messages on the session socket, and the layout of an import's shared
// cache. Like the shim's uapi header, this is the only place both sides
// agree on; it is header-only so that libsvm does not link svmd's code.
//
// A session (DESIGN.md section 4):
//   - The client connects to svmd's session socket (SOCK_SEQPACKET) and
//     sends kHello; svmd answers with the session memory (a sealed memfd)
//     and two eventfds: the submission doorbell (client -> svmd) and the
//     completion doorbell (svmd -> client).
//   - kOpen names an import or a local export and returns a handle; for an
//     import also the cache's two memfds, read-only: the pages and the
//     version words.
//   - kDeposit hands svmd a capability for an export: a svm_shim range fd
//     the client attached itself (the kernel checked the client's right to
//     the memory). svmd answers with a token that the gRPC ExportRequest
//     names (range_token); the deposit lives until that Export takes it or
//     the session ends.
//   - Reads travel as Sqe entries; svmd answers each with a Cqe. The bytes
//     land in the session's data area at the offset the Sqe names.
//   - Doorbells ring only when the other side said it sleeps (need_wakeup),
//     so a busy session costs no system call per request.
//
// The shared cache of an import: the data memfd holds the import's pages at
// their offsets (holes where nothing is cached); the words memfd holds a
// CacheHeader page, then one 64-bit version word per page. A word is 0 while
// its page is absent or changing, otherwise a number never used before for
// that page. svmd zeroes the word before it punches or replaces the page
// and stores a new number after the page is whole, so a reader that sees
// the same non-zero word before and after copying the page copied a whole
// page that no invalidation had removed when the copy began (rule 4 inside
// the node). svmd zeroes words before it acknowledges an invalidation.
// svmd's fetches land in the data memfd itself: a page present in the file
// while its word is 0 may be half written (never map or copy it).
#ifndef SVM_DAEMON_SESSION_ABI_H_
#define SVM_DAEMON_SESSION_ABI_H_

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace svm::session::abi {

inline constexpr uint32_t kMagic = 0x53564d53;  // "SVMS"
// 2: the client counters (SessionHeader::ctr_offset, ClientCounters).
// 3: completions "in the cache" (kInCache, kDoneInCache).
inline constexpr uint32_t kVersion = 3;
inline constexpr uint64_t kPageSize = 4096;

// ---- session memory ---------------------------------------------------------

// One side's view of a ring: the producer moves tail, the consumer head;
// both count without wrapping (index = counter % entries).
struct alignas(64) RingIndex {
  std::atomic<uint32_t> head;
  uint32_t pad0[15];
  std::atomic<uint32_t> tail;
  uint32_t pad1[15];
  // The consumer is asleep (or about to be) on the ring's eventfd: the
  // producer rings the doorbell after publishing. The consumer sets it,
  // rechecks the ring, then sleeps; the producer clears it when it rings.
  std::atomic<uint32_t> need_wakeup;
  // Completion ring only: svmd holds completions that did not fit; the
  // client rings the submission doorbell after it makes room.
  std::atomic<uint32_t> overflow;
  uint32_t pad2[14];
};
static_assert(sizeof(RingIndex) == 192);

struct SessionHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t sq_entries;  // a power of two
  uint32_t cq_entries;  // a power of two
  uint64_t sq_offset;   // of the Sqe array, from the start of the memory
  uint64_t cq_offset;
  uint64_t data_offset;  // of the data area
  uint64_t data_size;
  uint64_t size;  // of the whole memory
  uint64_t ev_offset;    // of the Event array
  uint32_t ev_entries;   // a power of two
  uint32_t pad;
  // Events svmd could not put in a full event ring (each watch that lost
  // one gets a whole-range overflow event when there is room again).
  std::atomic<uint64_t> ev_lost;
  // ClientCounters, one per handle (ctr_entries: the most handles a session
  // may open), at ctr_offset.
  uint64_t ctr_offset;
  uint32_t ctr_entries;
  uint32_t pad2;
  RingIndex sq;
  RingIndex cq;
  RingIndex ev;  // svmd produces, the client consumes; its own doorbell
};

// What a client served from an import's shared cache without a message to
// svmd (a read whose every page was cached), for the handle at this index.
// The client adds to them (relaxed); svmd adds what they grew by since it
// last looked into the import's metrics (svm_import_reads_total,
// svm_import_cache_hits_total) when they are scraped and when the session
// ends. They are untrusted: they feed those counters only, and a counter
// that shrank adds nothing.
struct ClientCounters {
  std::atomic<uint64_t> reads;
  std::atomic<uint64_t> pages_from_cache;
};
static_assert(sizeof(ClientCounters) == 16);

// An invalidation for a watch (kWatch), in the event ring.
struct Event {
  uint32_t watch;  // the id kWatchOk returned
  uint32_t kind;   // source::ChangeKind
  uint64_t first_page;
  uint64_t npages;  // 0: the whole range
  uint64_t seq;
  uint64_t detected_ns;
  uint64_t received_ns;  // when this node's svmd received it (0: an export's own event)
};
static_assert(sizeof(Event) == 48);

enum Opcode : uint16_t {
  kOpNop = 0,
  // Read len bytes at offset of the handle's import or export into the
  // data area at data_offset.
  kOpRead = 1,
};
enum SqeFlags : uint16_t {
  kFresh = 1,  // neither use nor fill the importer's cache
  // The pages must land in the shared cache (a fault of a mapping, a
  // prefetch): the staged path, even where zero-copy READs are offered.
  kFill = 2,
  // The client may take the bytes from the import's shared cache: when
  // svmd installed the pages there, it completes with kDoneInCache and
  // copies nothing into the data area. Never with kFresh or kFill.
  kInCache = 4,
};

// Cqe::flags of a successful completion.
enum CqeFlags : uint32_t {
  // The bytes are not in the data area: svmd installed the read's pages in
  // the shared cache (or found them there). The client copies them from
  // its mapping of the cache, each page checked against its version word
  // before and after (TryCopyPage) as a cache hit is; a page that fails the
  // check (invalidated, evicted, or never installed because the fetch
  // raced an invalidation) is read again without kInCache.
  kDoneInCache = 1,
};

struct Sqe {
  uint64_t user_data;  // echoed in the completion
  uint16_t opcode;
  uint16_t flags;
  uint32_t handle;
  uint64_t offset;       // in the import
  uint64_t len;          // bytes
  uint64_t data_offset;  // in the session's data area
  uint64_t reserved[3];
};
static_assert(sizeof(Sqe) == 64);

struct Cqe {
  uint64_t user_data;
  // An absl::StatusCode; on an error the message (msg_len bytes, no NUL) is
  // at the request's data_offset when that range was valid.
  uint32_t status;
  union {
    uint32_t msg_len;  // status != 0
    uint32_t flags;    // status == 0: CqeFlags
  };
  uint64_t seq;  // exporter's invalidation sequence the data is valid for
  uint32_t pages_from_cache;
  uint32_t pages_fetched;
};
static_assert(sizeof(Cqe) == 32);

// ---- the shared cache of an import ----------------------------------------------

struct CacheHeader {
  uint32_t magic;
  uint32_t version;
  uint64_t len;    // bytes of the import
  uint64_t pages;  // version words that follow the header page
  // The newest invalidation sequence the import applied.
  std::atomic<uint64_t> seq;
  // Set when svmd replaced this cache (the import was attached to an export
  // of another length) or removed it: holders open the import again.
  std::atomic<uint32_t> retired;
  uint32_t pad;
  // Cached pages may be used only while CLOCK_MONOTONIC is below this
  // (nanoseconds): the importer's lease on the exporter (coherence.h).
  std::atomic<int64_t> lease_until_ns;
};
inline constexpr uint64_t kWordsOffset = kPageSize;  // the words follow the header page

inline uint64_t WordsFileSize(uint64_t pages) { return kWordsOffset + pages * sizeof(uint64_t); }

// Copies one cached page if it is valid for the whole copy; false when it is
// absent or changed meanwhile (the caller fetches it). src is the page in
// the mapping of the data memfd; dst and src may be a partial page.
inline bool TryCopyPage(const std::atomic<uint64_t>* word, const uint8_t* src, uint8_t* dst,
                        size_t len, uint64_t* version) {
  const uint64_t before = word->load(std::memory_order_acquire);
  if (before == 0) return false;
  std::memcpy(dst, src, len);
  std::atomic_thread_fence(std::memory_order_acquire);
  const uint64_t after = word->load(std::memory_order_relaxed);
  if (after != before) return false;
  *version = before;
  return true;
}

// ---- messages on the session socket ------------------------------------------

enum MsgType : uint32_t {
  kHello = 1,   // client -> svmd; answer kHelloOk + fds {memory, sq, cq and event doorbells}
  kOpen = 2,    // client -> svmd; answer kOpenOk (+ fds {data, words} for an import)
  kError = 3,   // svmd -> client: the request failed; text in the message
  kHelloOk = 4,
  kOpenOk = 5,
  // client -> svmd (an OpenMsg): every invalidation of the name from now on
  // goes to the event ring; answer kOpenOk with handle = the watch's id.
  kWatch = 6,
  // client -> svmd (an UnwatchMsg): the watch ends; no answer. Events of it
  // already in the event ring stay there (the client drops them). Watch ids
  // are never reused within a session.
  kUnwatch = 7,
  // client -> svmd (a DepositMsg with one descriptor, a svm_shim range fd,
  // or two: the range fd, then the object the range maps, a memfd, for the
  // zero-copy path): answer kDepositOk, or kError (INVALID_ARGUMENT when the
  // first is not a range fd or the kernel says the range does not map the
  // second, RESOURCE_EXHAUSTED past the limit).
  kDeposit = 8,
  kDepositOk = 9,
};

inline constexpr size_t kMaxName = 255;
inline constexpr size_t kMaxMsg = 1024;

struct MsgHeader {
  uint32_t type;
  uint32_t len;  // of the whole message, header included
};

struct HelloMsg {
  MsgHeader h;
  uint32_t magic;
  uint32_t version;
};

struct HelloOkMsg {
  MsgHeader h;
  uint32_t version;
  uint32_t pad;
  uint64_t memory_size;
};

struct OpenMsg {
  MsgHeader h;
  uint32_t name_len;
  char name[kMaxName];
};

struct UnwatchMsg {
  MsgHeader h;
  uint32_t watch;
  uint32_t pad;  // zero
};

struct DepositMsg {
  MsgHeader h;
  uint32_t flags;  // zero
  uint32_t pad;    // zero
};

struct DepositOkMsg {
  MsgHeader h;
  uint64_t token;  // ExportRequest.range_token; never 0
};

enum HandleKind : uint32_t { kImport = 1, kExport = 2 };

struct OpenOkMsg {
  MsgHeader h;
  uint32_t handle;
  uint32_t kind;  // HandleKind; an import comes with its cache's two fds
  uint64_t len;
};

struct ErrorMsg {
  MsgHeader h;
  uint32_t code;  // absl::StatusCode
  uint32_t text_len;
  char text[kMaxMsg - 16];
};

// Sends one message with up to 4 descriptors. Returns 0 or an errno.
inline int SendMsg(int sock, const void* msg, size_t len, const int* fds, int nfds) {
  iovec iov{const_cast<void*>(msg), len};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  if (nfds > 0) {
    std::memset(control, 0, sizeof(control));
    mh.msg_control = control;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    ssize_t n = ::sendmsg(sock, &mh, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<size_t>(n) == len ? 0 : EMSGSIZE;
    if (errno != EINTR) return errno;
  }
}

// Receives one message into buf and up to 4 descriptors (the rest are
// closed). Returns the message length, 0 at the end of the connection, or
// -errno. *nfds is set to how many descriptors were stored in fds.
inline ssize_t RecvMsg(int sock, void* buf, size_t cap, int* fds, int* nfds, int flags = 0) {
  iovec iov{buf, cap};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  mh.msg_control = control;
  mh.msg_controllen = sizeof(control);
  *nfds = 0;
  ssize_t n;
  do {
    n = ::recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | flags);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -errno;
  for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const int count = static_cast<int>((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
    for (int i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (*nfds < 4 && fds != nullptr) {
        fds[(*nfds)++] = fd;
      } else {
        ::close(fd);
      }
    }
  }
  if (mh.msg_flags & MSG_TRUNC) return -EMSGSIZE;
  return n;
}

}  // namespace svm::session::abi

#endif  // SVM_DAEMON_SESSION_ABI_H_
