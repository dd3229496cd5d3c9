#include "svm/types.h"

namespace svm {
inline namespace abi1 {

std::string_view InvalidationKindName(InvalidationKind kind) {
  switch (kind) {
    case InvalidationKind::kUnmap: return "unmap";
    case InvalidationKind::kRemap: return "remap";
    case InvalidationKind::kWrite: return "write";
    case InvalidationKind::kProtection: return "protection";
    case InvalidationKind::kExit: return "exit";
    case InvalidationKind::kUnexport: return "unexport";
    case InvalidationKind::kReconnect: return "reconnect";
    case InvalidationKind::kOverflow: return "overflow";
    case InvalidationKind::kOther: return "other";
    case InvalidationKind::kUnspecified: break;
  }
  return "unspecified";
}

}  // namespace abi1
}  // namespace svm
