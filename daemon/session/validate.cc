#include "daemon/session/validate.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace svm::session {

absl::StatusOr<ReadRequest> ParseSqe(const abi::Sqe& e, const SqeLimits& lim) {
  ReadRequest r;
  r.user_data = e.user_data;
  if (e.opcode == abi::kOpNop) {
    r.nop = true;
    return r;
  }
  if (e.opcode != abi::kOpRead) {
    return absl::InvalidArgumentError(absl::StrFormat("unknown opcode %u", e.opcode));
  }
  const uint16_t exclusive = e.flags & (abi::kFresh | abi::kFill | abi::kInCache);
  if ((e.flags & ~(abi::kFresh | abi::kFill | abi::kInCache)) != 0 || (exclusive & (exclusive - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrFormat("unknown flags 0x%x", e.flags));
  }
  if (e.handle >= lim.handle_len.size()) {
    return absl::InvalidArgumentError(absl::StrFormat("handle %u is not open", e.handle));
  }
  if (e.len == 0) return absl::InvalidArgumentError("len must be > 0");
  if (e.len > kMaxEntryLen) {
    return absl::InvalidArgumentError(
        absl::StrFormat("len %u is above the %u-byte limit of one entry", e.len, kMaxEntryLen));
  }
  if (e.data_offset > lim.data_size || e.len > lim.data_size - e.data_offset) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "data range %u+%u is outside the %u-byte data area", e.data_offset, e.len, lim.data_size));
  }
  const uint64_t import_len = lim.handle_len[e.handle];
  if (e.offset > import_len || e.len > import_len - e.offset) {
    return absl::OutOfRangeError(absl::StrFormat(
        "read of %u bytes at offset %u is past the end (%u bytes)", e.len, e.offset, import_len));
  }
  r.handle = e.handle;
  r.offset = e.offset;
  r.len = e.len;
  r.data_offset = e.data_offset;
  r.fresh = (e.flags & abi::kFresh) != 0;
  r.fill = (e.flags & abi::kFill) != 0;
  r.in_cache = (e.flags & abi::kInCache) != 0;
  return r;
}

absl::StatusOr<ClientMsg> ParseClientMsg(const void* buf, size_t len) {
  abi::MsgHeader h;
  if (len < sizeof(h)) return absl::InvalidArgumentError("message shorter than its header");
  std::memcpy(&h, buf, sizeof(h));
  if (h.len != len) {
    return absl::InvalidArgumentError(absl::StrFormat("message says %u bytes, %u arrived", h.len, len));
  }
  ClientMsg m;
  switch (h.type) {
    case abi::kHello: {
      abi::HelloMsg hello;
      if (len != sizeof(hello)) return absl::InvalidArgumentError("hello of the wrong size");
      std::memcpy(&hello, buf, sizeof(hello));
      if (hello.magic != abi::kMagic) return absl::InvalidArgumentError("not an svm session client");
      if (hello.version != abi::kVersion) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "session protocol %u; this svmd speaks %u", hello.version, abi::kVersion));
      }
      m.type = abi::kHello;
      return m;
    }
    case abi::kOpen:
    case abi::kWatch: {
      abi::OpenMsg open;
      constexpr size_t kFixed = offsetof(abi::OpenMsg, name);
      if (len < kFixed || len > sizeof(open)) return absl::InvalidArgumentError("open of the wrong size");
      std::memset(&open, 0, sizeof(open));
      std::memcpy(&open, buf, len);
      if (open.name_len == 0 || open.name_len > abi::kMaxName || kFixed + open.name_len != len) {
        return absl::InvalidArgumentError("open: bad name length");
      }
      m.type = static_cast<abi::MsgType>(h.type);
      m.name.assign(open.name, open.name_len);
      return m;
    }
    case abi::kUnwatch: {
      abi::UnwatchMsg u;
      if (len != sizeof(u)) return absl::InvalidArgumentError("unwatch of the wrong size");
      std::memcpy(&u, buf, sizeof(u));
      if (u.pad != 0) return absl::InvalidArgumentError("unwatch: padding not zero");
      m.type = abi::kUnwatch;
      m.watch = u.watch;
      return m;
    }
    case abi::kDeposit: {
      abi::DepositMsg d;
      if (len != sizeof(d)) return absl::InvalidArgumentError("deposit of the wrong size");
      std::memcpy(&d, buf, sizeof(d));
      if (d.flags != 0 || d.pad != 0) return absl::InvalidArgumentError("deposit: flags or padding not zero");
      m.type = abi::kDeposit;
      return m;
    }
    default:
      return absl::InvalidArgumentError(absl::StrFormat("unknown message type %u", h.type));
  }
}

}  // namespace svm::session
