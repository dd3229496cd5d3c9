#include "daemon/transport/frame.h"

#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_format.h"
#include "common/fd.h"
#include "daemon/source/mirror_source.h"

namespace svm::transport {

absl::Status ValidateHeader(const FrameHeader& h) {
  if (h.magic != kFrameMagic) return absl::DataLossError(absl::StrFormat("bad frame magic 0x%08x", h.magic));
  if (h.version != kFrameVersion) {
    return absl::DataLossError(absl::StrFormat("unsupported frame version %u", h.version));
  }
  if (h.type < static_cast<uint8_t>(FrameType::kHello) ||
      h.type > static_cast<uint8_t>(FrameType::kInvalAck)) {
    return absl::DataLossError(absl::StrFormat("unknown frame type %u", h.type));
  }
  if (h.payload_len > kMaxPayload) {
    return absl::DataLossError(absl::StrFormat("frame payload of %u bytes is too large", h.payload_len));
  }
  return absl::OkStatus();
}

bool MergeInvalFrame(std::vector<uint8_t>& queued, const InvalPayload& next) {
  if (queued.size() != sizeof(FrameHeader) + sizeof(InvalPayload)) return false;
  FrameHeader h;
  std::memcpy(&h, queued.data(), sizeof(h));
  if (h.type != static_cast<uint8_t>(FrameType::kInval)) return false;
  InvalPayload q;
  std::memcpy(&q, queued.data() + sizeof(h), sizeof(q));
  auto terminal = [](uint32_t k) {
    return k == static_cast<uint32_t>(source::ChangeKind::kExit) ||
           k == static_cast<uint32_t>(source::ChangeKind::kUnexport);
  };
  if (q.export_id != next.export_id || terminal(q.kind) || terminal(next.kind)) return false;
  const uint64_t end = std::max(q.first_page + q.npages, next.first_page + next.npages);
  q.first_page = std::min(q.first_page, next.first_page);
  q.npages = end - q.first_page;
  q.seq = std::max(q.seq, next.seq);
  if (q.kind != next.kind) q.kind = static_cast<uint32_t>(source::ChangeKind::kOverflow);
  q.detected_ns = std::min(q.detected_ns, next.detected_ns);
  std::memcpy(queued.data() + sizeof(h), &q, sizeof(q));
  return true;
}

std::vector<uint8_t> MakeFrame(FrameType type, uint64_t id, const void* fixed, size_t fixed_len,
                               const void* tail, size_t tail_len, size_t max_frame) {
  const size_t room = max_frame - std::min(max_frame, sizeof(FrameHeader) + fixed_len);
  tail_len = std::min(tail_len, room);
  FrameHeader h;
  h.type = static_cast<uint8_t>(type);
  h.id = id;
  h.payload_len = static_cast<uint32_t>(fixed_len + tail_len);
  std::vector<uint8_t> out(sizeof(h) + fixed_len + tail_len);
  std::memcpy(out.data(), &h, sizeof(h));
  if (fixed_len) std::memcpy(out.data() + sizeof(h), fixed, fixed_len);
  if (tail_len) std::memcpy(out.data() + sizeof(h) + fixed_len, tail, tail_len);
  return out;
}

std::vector<uint8_t> MakeFetchError(uint64_t id, const absl::Status& st, size_t max_frame) {
  FetchRespPayload r{};
  absl::string_view msg = st.message();
  msg = msg.substr(0, max_frame - std::min(max_frame, sizeof(FrameHeader) + sizeof(r)));
  r.code = static_cast<uint32_t>(st.code());
  r.msg_len = static_cast<uint32_t>(msg.size());
  return MakeFrame(FrameType::kFetchResp, id, &r, sizeof(r), msg.data(), msg.size(), max_frame);
}

absl::Status FetchErrorStatus(const FetchRespPayload& r, absl::string_view msg) {
  if (r.code == 0 || r.code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated) ||
      r.msg_len != msg.size()) {
    return absl::DataLossError("malformed FETCH_RESP error");
  }
  return absl::Status(static_cast<absl::StatusCode>(r.code), msg);
}

absl::Status CheckFetchPages(uint32_t npages, uint32_t max_pages) {
  if (npages == 0 || npages > max_pages) {
    return absl::InvalidArgumentError(
        absl::StrFormat("fetch of %u pages (1..%u allowed)", npages, max_pages));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> MakeRdmaHello(const RdmaHello& hello, size_t max_frame) {
  const RdmaHelloPayload p{hello.area_addr, hello.area_len, hello.rkey, kRdmaProtocolVersion};
  if (sizeof(FrameHeader) + sizeof(p) + hello.token.size() > max_frame) {
    return absl::InvalidArgumentError("rdma HELLO does not fit one message");
  }
  auto frame = MakeFrame(FrameType::kHello, 0, &p, sizeof(p), hello.token.data(),
                         hello.token.size(), max_frame);
  // What we send must pass our own parser.
  if (auto back = ParseRdmaHello(absl::MakeConstSpan(frame).subspan(sizeof(FrameHeader)));
      !back.ok()) {
    return absl::InvalidArgumentError(back.status().message());
  }
  return frame;
}

absl::StatusOr<RdmaHello> ParseRdmaHello(absl::Span<const uint8_t> payload) {
  RdmaHelloPayload p;
  if (payload.size() < sizeof(p)) {
    return absl::DataLossError(absl::StrFormat("rdma HELLO of %u bytes", payload.size()));
  }
  std::memcpy(&p, payload.data(), sizeof(p));
  const size_t token_len = payload.size() - sizeof(p);
  if (p.area_len == 0 || p.area_addr + p.area_len < p.area_addr) {
    return absl::DataLossError(absl::StrFormat("rdma HELLO with a receive area of %u bytes at 0x%x",
                                               p.area_len, p.area_addr));
  }
  if (token_len == 0 || token_len > kMaxTokenBytes) {
    return absl::DataLossError(absl::StrFormat("rdma HELLO with a %u-byte token", token_len));
  }
  if (p.version != kRdmaProtocolVersion) {
    return absl::FailedPreconditionError(
        absl::StrFormat("rdma HELLO of protocol version %u; this daemon speaks version %u "
                        "(run the same svm release on both nodes)",
                        p.version == 0 ? 1 : p.version, kRdmaProtocolVersion));
  }
  RdmaHello h;
  h.area_addr = p.area_addr;
  h.area_len = p.area_len;
  h.rkey = p.rkey;
  h.token.assign(reinterpret_cast<const char*>(payload.data()) + sizeof(p), token_len);
  return h;
}

absl::StatusOr<RdmaFetchPayload> ParseRdmaFetch(absl::Span<const uint8_t> payload) {
  RdmaFetchPayload f;
  if (payload.size() != sizeof(f)) {
    return absl::DataLossError(absl::StrFormat("rdma FETCH of %u bytes", payload.size()));
  }
  std::memcpy(&f, payload.data(), sizeof(f));
  if (f.pad != 0) return absl::DataLossError("rdma FETCH with non-zero padding");
  const uint64_t bytes = uint64_t{f.f.npages} * source::kPageSize;
  if (f.addr + bytes < f.addr) {
    return absl::DataLossError(absl::StrFormat("rdma FETCH of %u pages to 0x%x wraps around", f.f.npages, f.addr));
  }
  return f;
}

absl::StatusOr<Message> SplitMessage(absl::Span<const uint8_t> msg, size_t max_msg) {
  Message m;
  if (msg.size() < sizeof(m.header) || msg.size() > max_msg) {
    return absl::DataLossError(absl::StrFormat("%u-byte message", msg.size()));
  }
  std::memcpy(&m.header, msg.data(), sizeof(m.header));
  if (auto st = ValidateHeader(m.header); !st.ok()) return st;
  if (m.header.payload_len != msg.size() - sizeof(m.header)) {
    return absl::DataLossError("message length mismatch");
  }
  m.payload = msg.subspan(sizeof(m.header));
  return m;
}

InvalPayload ToInvalPayload(const InvalRecord& r) {
  return InvalPayload{r.export_id, r.first_page, r.npages, r.seq, static_cast<uint32_t>(r.kind), 0,
                      r.detected_ns};
}

InvalRecord FromInvalPayload(const InvalPayload& p) {
  return InvalRecord{p.export_id, p.first_page, p.npages, p.seq,
                     static_cast<source::ChangeKind>(p.kind), p.detected_ns};
}

absl::Status CheckFrameHeader(const FrameHeader& h, uint32_t max_payload) {
  if (auto st = ValidateHeader(h); !st.ok()) return st;
  if (h.payload_len > max_payload) {
    return absl::DataLossError(
        absl::StrFormat("frame payload of %u bytes (at most %u here)", h.payload_len, max_payload));
  }
  return absl::OkStatus();
}

absl::Status ReadFrameHeader(int fd, FrameHeader* h, uint32_t max_payload) {
  if (auto st = ReadFull(fd, h, sizeof(*h)); !st.ok()) return st;
  return CheckFrameHeader(*h, max_payload);
}

absl::Status ReadFrame(int fd, FrameHeader* h, std::vector<uint8_t>* payload, uint32_t max_payload) {
  if (auto st = ReadFrameHeader(fd, h, max_payload); !st.ok()) return st;
  payload->resize(h->payload_len);
  if (h->payload_len == 0) return absl::OkStatus();
  auto st = ReadFull(fd, payload->data(), h->payload_len);
  if (absl::IsOutOfRange(st)) return absl::DataLossError("connection closed mid-frame");
  return st;
}

absl::Status FrameReader::Fill() {
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (end_ == buf_.size()) {
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  for (;;) {
    ssize_t n;
    if (spin_until_ != std::chrono::steady_clock::time_point{}) {
      n = ::recv(fd_, buf_.data() + end_, buf_.size() - end_, MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (std::chrono::steady_clock::now() < spin_until_) {
          ::sched_yield();
        } else {
          spin_until_ = {};
        }
        continue;
      }
    } else {
      n = ::read(fd_, buf_.data() + end_, buf_.size() - end_);
    }
    if (n > 0) {
      end_ += static_cast<size_t>(n);
      return absl::OkStatus();
    }
    if (n == 0) return absl::OutOfRangeError("end of stream");
    if (errno == EINTR) continue;
    return ErrnoStatus(errno, "read");
  }
}

absl::Status FrameReader::Next(FrameHeader* h, std::vector<uint8_t>* payload, uint32_t max_payload) {
  const bool started = buffered() > 0;
  while (buffered() < sizeof(*h)) {
    if (auto st = Fill(); !st.ok()) {
      if (absl::IsOutOfRange(st) && (started || buffered() > 0)) {
        return absl::DataLossError("connection closed mid-message");
      }
      return st;
    }
  }
  std::memcpy(h, buf_.data() + begin_, sizeof(*h));
  if (auto st = CheckFrameHeader(*h, max_payload); !st.ok()) return st;
  begin_ += sizeof(*h);
  payload->resize(h->payload_len);
  // What is buffered first; a payload larger than the buffer is read
  // straight into place.
  const size_t take = std::min<size_t>(buffered(), h->payload_len);
  if (take > 0) std::memcpy(payload->data(), buf_.data() + begin_, take);
  begin_ += take;
  if (take == h->payload_len) return absl::OkStatus();
  const size_t rest = h->payload_len - take;
  if (rest < buf_.size() / 2) {
    while (buffered() < rest) {
      if (auto st = Fill(); !st.ok()) {
        return absl::IsOutOfRange(st) ? absl::DataLossError("connection closed mid-frame") : st;
      }
    }
    std::memcpy(payload->data() + take, buf_.data() + begin_, rest);
    begin_ += rest;
    return absl::OkStatus();
  }
  auto st = ReadFull(fd_, payload->data() + take, rest);
  if (absl::IsOutOfRange(st)) return absl::DataLossError("connection closed mid-frame");
  return st;
}

}  // namespace svm::transport
