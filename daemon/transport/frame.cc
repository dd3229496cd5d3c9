#include "daemon/transport/frame.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
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

}  // namespace svm::transport
