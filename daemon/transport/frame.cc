#include "daemon/transport/frame.h"

#include "absl/strings/str_format.h"

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

}  // namespace svm::transport
