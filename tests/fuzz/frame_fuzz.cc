// libFuzzer target: the data connection's frame header validation and the
// merging of queued INVAL frames, on bytes as a peer would send them.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "daemon/transport/frame.h"

using svm::transport::FrameHeader;
using svm::transport::InvalPayload;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < sizeof(FrameHeader)) return 0;
  FrameHeader h;
  std::memcpy(&h, data, sizeof(h));
  (void)svm::transport::ValidateHeader(h);
  // A queued frame (the rest of the input) absorbing an INVAL made of its
  // own tail: never grows the frame, never reads past it.
  std::vector<uint8_t> queued(data, data + size);
  InvalPayload next{};
  if (size >= sizeof(FrameHeader) + sizeof(InvalPayload)) {
    std::memcpy(&next, data + size - sizeof(next), sizeof(next));
  }
  const size_t before = queued.size();
  (void)svm::transport::MergeInvalFrame(queued, next);
  if (queued.size() != before) std::abort();
  return 0;
}
