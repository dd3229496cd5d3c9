// libFuzzer target: what a session's client writes, as svmd parses it —
// messages on the session socket and submission ring entries
// (daemon/session/validate.h). Every entry ParseSqe accepts names an open
// handle and a range inside both the import and the data area.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "daemon/session/validate.h"

namespace sabi = svm::session::abi;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  ++data;
  --size;
  if (mode % 2 == 0) {
    auto m = svm::session::ParseClientMsg(data, size);
    if (m.ok() && m->type == sabi::kOpen && (m->name.empty() || m->name.size() > sabi::kMaxName)) {
      std::abort();
    }
    if (m.ok() && m->type == sabi::kUnwatch && size != sizeof(sabi::UnwatchMsg)) std::abort();
    if (m.ok() && m->type == sabi::kDeposit && size != sizeof(sabi::DepositMsg)) std::abort();
    return 0;
  }
  // An entry, then the session's limits: data area size and handle lengths.
  sabi::Sqe e{};
  std::memcpy(&e, data, std::min(size, sizeof(e)));
  svm::session::SqeLimits lim;
  size_t off = sizeof(e);
  if (size >= off + 8) {
    std::memcpy(&lim.data_size, data + off, 8);
    off += 8;
  }
  for (; size >= off + 8 && lim.handle_len.size() < 8; off += 8) {
    uint64_t len;
    std::memcpy(&len, data + off, 8);
    lim.handle_len.push_back(len);
  }
  auto r = svm::session::ParseSqe(e, lim);
  if (!r.ok() || r->nop) return 0;
  if (r->handle >= lim.handle_len.size()) std::abort();
  if (r->len == 0 || r->data_offset + r->len > lim.data_size || r->data_offset + r->len < r->len) std::abort();
  const uint64_t ilen = lim.handle_len[r->handle];
  if (r->offset + r->len > ilen || r->offset + r->len < r->len) std::abort();
  // fresh, fill and in_cache exclude each other.
  if (int{r->fresh} + int{r->fill} + int{r->in_cache} > 1) std::abort();
  return 0;
}
