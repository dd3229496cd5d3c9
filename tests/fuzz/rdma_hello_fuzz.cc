// libFuzzer target: what the rdma exporter does with the first message a
// new queue pair receives, on bytes as an unauthenticated peer would send
// them: one receive buffer split into header and payload (SplitMessage),
// then the HELLO's payload decoded (ParseRdmaHello), and a FETCH's
// (ParseRdmaFetch: what an established importer sends). Every input ends in
// a status, never a crash; whatever is accepted is what the parser
// promises, and a HELLO built from it parses back to the same values.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "daemon/transport/frame.h"

namespace {

constexpr size_t kMsgSize = 512;  // the rdma transport's receive buffer

void CheckHello(absl::Span<const uint8_t> payload) {
  using svm::transport::RdmaHelloPayload;
  auto h = svm::transport::ParseRdmaHello(payload);
  if (!h.ok()) {
    // Malformed input is DATA_LOSS; another protocol version FAILED_PRECONDITION.
    if (absl::IsDataLoss(h.status()) || absl::IsFailedPrecondition(h.status())) return;
    std::abort();
  }
  if (h->area_len == 0 || h->area_addr + h->area_len < h->area_addr || h->token.empty() ||
      h->token.size() > svm::transport::kMaxTokenBytes ||
      h->token.size() != payload.size() - sizeof(RdmaHelloPayload)) {
    std::abort();
  }
  auto again = svm::transport::MakeRdmaHello(*h, kMsgSize);
  if (!again.ok()) std::abort();  // every accepted HELLO fits a message
  auto back = svm::transport::ParseRdmaHello(
      absl::MakeConstSpan(*again).subspan(sizeof(svm::transport::FrameHeader)));
  if (!back.ok() || back->area_addr != h->area_addr || back->area_len != h->area_len ||
      back->rkey != h->rkey || back->token != h->token) {
    std::abort();
  }
}

void CheckFetch(absl::Span<const uint8_t> payload) {
  auto f = svm::transport::ParseRdmaFetch(payload);
  if (!f.ok()) {
    if (absl::IsDataLoss(f.status())) return;
    std::abort();
  }
  if (payload.size() != sizeof(svm::transport::RdmaFetchPayload) || f->pad != 0 ||
      f->addr + uint64_t{f->f.npages} * 4096 < f->addr) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::Span<const uint8_t> bytes(data, size);
  // As received: one message per SEND.
  auto m = svm::transport::SplitMessage(bytes, kMsgSize);
  if (m.ok()) {
    if (m->payload.size() != m->header.payload_len ||
        m->payload.data() != data + sizeof(svm::transport::FrameHeader)) {
      std::abort();
    }
    if (m->header.type == static_cast<uint8_t>(svm::transport::FrameType::kHello)) {
      CheckHello(m->payload);
    }
    if (m->header.type == static_cast<uint8_t>(svm::transport::FrameType::kFetch)) {
      CheckFetch(m->payload);
    }
  } else if (!absl::IsDataLoss(m.status())) {
    std::abort();
  }
  // The payload parser on its own, on every input.
  CheckHello(bytes);
  CheckFetch(bytes);
  return 0;
}
