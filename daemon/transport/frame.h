// The data-connection wire format, shared by the tcp and rdma transports
// (tcp: a byte stream of frames; rdma: one frame per SEND): a fixed 32-byte
// header, then a payload of header.payload_len bytes. All integers little-endian (the
// daemons run on x86_64 and aarch64; both are little-endian).
//
//   HELLO      importer -> exporter  first frame: session token (rdma: the
//                                    receive area first, RdmaHelloPayload)
//   FETCH      importer -> exporter  pages of an export (id = request id)
//   FETCH_RESP exporter -> importer  status, seq at read time, page bytes
//   INVAL      exporter -> importer  pages invalidated, with their seq
//   INVAL_ACK  importer -> exporter  the importer dropped them
//
// A frame that breaks these rules ends the connection; the peer recovers by
// reconnecting (and invalidating everything it held).
#ifndef SVM_DAEMON_TRANSPORT_FRAME_H_
#define SVM_DAEMON_TRANSPORT_FRAME_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "daemon/transport/transport.h"

namespace svm::transport {

inline constexpr uint32_t kFrameMagic = 0x444d5653;  // "SVMD"
inline constexpr uint8_t kFrameVersion = 1;
inline constexpr uint32_t kMaxFetchPages = 1024;      // 4 MiB per request
inline constexpr uint32_t kMaxPayload = kMaxFetchPages * 4096 + 4096;

enum class FrameType : uint8_t {
  kHello = 1,
  kFetch = 2,
  kFetchResp = 3,
  kInval = 4,
  kInvalAck = 5,
};

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint8_t version = kFrameVersion;
  uint8_t type = 0;
  uint16_t flags = 0;
  uint32_t payload_len = 0;
  uint32_t reserved = 0;
  uint64_t id = 0;
  uint64_t reserved2 = 0;
};
static_assert(sizeof(FrameHeader) == 32);

// Checks magic, version, type and payload size.
absl::Status ValidateHeader(const FrameHeader& h);

inline constexpr uint32_t kFetchNoCache = 1;  // importer will not cache: do not track

struct FetchPayload {
  uint64_t export_id;
  uint64_t first_page;
  uint32_t npages;
  uint32_t flags;
};
static_assert(sizeof(FetchPayload) == 24);

// Followed by npages pages on success, or by a UTF-8 message on failure.
struct FetchRespPayload {
  uint32_t code;  // absl::StatusCode
  uint32_t msg_len;
  uint64_t seq;
};
static_assert(sizeof(FetchRespPayload) == 16);

struct InvalPayload {
  uint64_t export_id;
  uint64_t first_page;
  uint64_t npages;
  uint64_t seq;
  uint32_t kind;  // source::ChangeKind
  uint32_t pad;
  uint64_t detected_ns;
};
static_assert(sizeof(InvalPayload) == 48);

// Invalidation storms: the last queued (unsent) frame, when it is an INVAL
// of the same export, absorbs the next one instead of a new frame being
// queued: the union of both ranges, the newer sequence, the kind if both
// agree (kOverflow otherwise), the earlier detection time. Invalidating
// more, or earlier, is always safe; nothing moves ahead of a response, since
// only the tail is merged into. Exit and unexport INVALs are never merged
// (the importer acts on their kind). Returns whether next was absorbed.
bool MergeInvalFrame(std::vector<uint8_t>& queued, const InvalPayload& next);

struct InvalAckPayload {
  uint64_t export_id;
  uint64_t seq;
};

// Session tokens in a HELLO: 1 to kMaxTokenBytes bytes (SessionRegistry
// issues 16).
inline constexpr size_t kMaxTokenBytes = 64;

// rdma: the version of the protocol on the queue pair (the FETCH below, the
// HELLOs). 1: FETCH named an offset in the importer's receive area (the
// version field was padding, 0). 2: FETCH names an address and rkey of the
// importer's, so pages land where the importer registered them (its shared
// cache, a reader's buffer). A peer of another version is refused at the
// HELLO, with both versions in the error.
inline constexpr uint32_t kRdmaProtocolVersion = 2;

// rdma: the importer's HELLO, the first SEND on a new queue pair. The tcp
// HELLO's token follows this fixed part; it names the importer's registered
// receive area (where pages land when the importer registered nothing
// better for a FETCH).
struct RdmaHelloPayload {
  uint64_t area_addr;
  uint64_t area_len;
  uint32_t rkey;
  uint32_t version;  // kRdmaProtocolVersion (0 from a version-1 importer)
};
static_assert(sizeof(RdmaHelloPayload) == 24);

// rdma: the exporter's answer to the HELLO (later HELLOs are keepalives and
// carry nothing). A HELLO whose token the exporter did not issue for this
// queue pair, or that another connection already claimed, is answered with
// `refused` set before the exporter closes the queue pair, so the importer
// fails at once instead of at its HELLO timeout (an exporter that predates
// the field sent 0 and answered nothing to such a HELLO).
inline constexpr uint32_t kRdmaHelloRefused = 1;
struct RdmaHelloAnswerPayload {
  uint32_t version;  // kRdmaProtocolVersion
  uint32_t refused;  // 0, or kRdmaHelloRefused
};
static_assert(sizeof(RdmaHelloAnswerPayload) == 8);

// rdma: a FETCH (version 2): the tcp payload, then where the exporter
// RDMA-WRITEs the pages (npages pages at addr under the importer's rkey;
// the importer's NIC checks it: a target outside that registration fails
// the WRITE and the connection closes).
struct RdmaFetchPayload {
  FetchPayload f;
  uint64_t addr;
  uint32_t rkey;
  uint32_t pad;  // 0
};
static_assert(sizeof(RdmaFetchPayload) == 40);

// The payload of an rdma FETCH: DATA_LOSS unless it is exactly an
// RdmaFetchPayload with pad 0 whose target does not wrap around the address
// space (npages is checked by the exporter, CheckFetchPages).
absl::StatusOr<RdmaFetchPayload> ParseRdmaFetch(absl::Span<const uint8_t> payload);

// An RdmaHelloPayload and its token, decoded.
struct RdmaHello {
  uint64_t area_addr = 0;
  uint64_t area_len = 0;
  uint32_t rkey = 0;
  std::string token;
};

// ------------------------------------------------- building and reading
// The one frame builder of both transports.

inline constexpr size_t kMaxFrame = sizeof(FrameHeader) + kMaxPayload;

// header, fixed_len bytes of fixed, then tail_len bytes of tail. The tail is
// cut so that the frame fits in max_frame bytes (an rdma message fills at
// most one receive buffer; what gets cut is error text).
std::vector<uint8_t> MakeFrame(FrameType type, uint64_t id, const void* fixed, size_t fixed_len,
                               const void* tail = nullptr, size_t tail_len = 0,
                               size_t max_frame = kMaxFrame);

// A FETCH_RESP that carries st (not OK): its code and its message, cut to
// fit max_frame with msg_len saying what is left.
std::vector<uint8_t> MakeFetchError(uint64_t id, const absl::Status& st, size_t max_frame = kMaxFrame);

// The status of a FETCH_RESP whose code is not 0; msg: the bytes after the
// fixed payload. DATA_LOSS when the code or the length is not one a
// well-behaved exporter sends.
absl::Status FetchErrorStatus(const FetchRespPayload& r, absl::string_view msg);

// The exporter's check of a FETCH before its backend sees it:
// INVALID_ARGUMENT unless 1 <= npages <= max_pages.
absl::Status CheckFetchPages(uint32_t npages, uint32_t max_pages);

// The rdma HELLO frame; INVALID_ARGUMENT when hello is not one
// ParseRdmaHello accepts or the frame would not fit max_frame (a token is
// never cut).
absl::StatusOr<std::vector<uint8_t>> MakeRdmaHello(const RdmaHello& hello, size_t max_frame);

// The payload of an rdma HELLO, from a peer not yet authenticated: DATA_LOSS
// unless it holds the fixed part, a non-empty area that does not wrap around
// the address space, and a token of 1 to kMaxTokenBytes bytes;
// FAILED_PRECONDITION (naming both versions) when its version is not
// kRdmaProtocolVersion.
absl::StatusOr<RdmaHello> ParseRdmaHello(absl::Span<const uint8_t> payload);

// rdma: one received message (one SEND, at most max_msg bytes) split into
// its header (ValidateHeader passed) and its payload, which must be exactly
// header.payload_len bytes. DATA_LOSS otherwise.
struct Message {
  FrameHeader header;
  absl::Span<const uint8_t> payload;  // points into the bytes given
};
absl::StatusOr<Message> SplitMessage(absl::Span<const uint8_t> msg, size_t max_msg);

InvalPayload ToInvalPayload(const InvalRecord& r);
InvalRecord FromInvalPayload(const InvalPayload& p);

// Reads one frame from a stream socket: header checked (ValidateHeader,
// then payload_len <= max_payload) before the payload is read. OUT_OF_RANGE
// on a clean EOF before the header, DATA_LOSS on one inside the frame.
absl::Status ReadFrame(int fd, FrameHeader* h, std::vector<uint8_t>* payload,
                       uint32_t max_payload = kMaxPayload);
// A stream socket's frames, read with as few system calls as the stream
// allows: each read takes whatever has arrived, up to the buffer's size, so
// the FETCHes an importer wrote at once cost the exporter one read between
// them, and a frame's header and payload one read. Checks as ReadFrame.
// Blocking reads (the socket's SO_RCVTIMEO applies); one thread at a time.
class FrameReader {
 public:
  explicit FrameReader(int fd, size_t capacity = 16 << 10) : fd_(fd), buf_(capacity) {}
  // As ReadFrame: OUT_OF_RANGE on a clean EOF before a frame, DATA_LOSS on
  // one inside it or a header that fails CheckFrameHeader(max_payload).
  absl::Status Next(FrameHeader* h, std::vector<uint8_t>* payload, uint32_t max_payload = kMaxPayload);
  // Bytes received and not yet returned: another frame (or part of one)
  // is waiting.
  size_t buffered() const { return end_ - begin_; }
  // For this long from now, a read finding nothing yields the CPU and
  // tries again instead of sleeping (a thread that expects the next frame
  // soon saves its wakeup); then it sleeps in read(2) again.
  void SpinFor(std::chrono::microseconds d) { spin_until_ = std::chrono::steady_clock::now() + d; }

 private:
  // Reads once more (at least one byte, or an error); compacts first.
  absl::Status Fill();

  const int fd_;
  std::vector<uint8_t> buf_;
  size_t begin_ = 0, end_ = 0;  // buf_[begin_, end_) is received, not returned
  std::chrono::steady_clock::time_point spin_until_{};  // epoch: not spinning
};

// ReadFrame's first half: the header alone, checked the same way; the
// caller reads exactly h->payload_len bytes next (the tcp importer receives
// a FETCH_RESP's pages straight into the fetch's buffer).
absl::Status ReadFrameHeader(int fd, FrameHeader* h, uint32_t max_payload = kMaxPayload);
// ReadFrameHeader's check of a header read by other means.
absl::Status CheckFrameHeader(const FrameHeader& h, uint32_t max_payload = kMaxPayload);

}  // namespace svm::transport

#endif  // SVM_DAEMON_TRANSPORT_FRAME_H_
