#include "daemon/service/range_deposits.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/random.h"

namespace svm::service {

absl::StatusOr<uint64_t> RangeDeposits::Add(const PeerCred& who, uint64_t session, UniqueFd fd,
                                             UniqueFd object) {
  auto info = source::InspectRangeFd(fd.get());
  if (!info.ok()) return info.status();
  if (object.valid()) {
    // Never the client's word: a forged object (another file) is refused here.
    auto offset = source::RangeObjectOffset(fd.get(), object.get());
    if (absl::IsFailedPrecondition(offset.status())) {
      spdlog::info("pid {} deposited an object beside its range fd; {}: served staged", who.pid,
                   offset.status().message());
      object.Reset();
    } else if (!offset.ok()) {
      return absl::Status(offset.status().code(),
                          absl::StrCat("the deposited object: ", offset.status().message()));
    }
  }
  absl::MutexLock l(&mu_);
  size_t held = 0;
  for (const auto& [t, e] : by_token_) held += e.session == session;
  if (held >= kMaxPerSession) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a session may hold ", kMaxPerSession, " deposited range fds"));
  }
  uint64_t token;
  do {
    token = RandomU64();
  } while (token == 0 || by_token_.contains(token));
  by_token_[token] = Entry{Deposit{std::move(fd), *info, std::move(object)}, who.pid, session};
  return token;
}

absl::StatusOr<RangeDeposits::Deposit> RangeDeposits::Take(uint64_t token, const PeerCred& who) {
  absl::MutexLock l(&mu_);
  auto it = by_token_.find(token);
  if (it == by_token_.end() || it->second.pid != who.pid) {
    return absl::NotFoundError(absl::StrCat(
        "no range fd deposited under token ", token,
        " by this process (a deposit lives until its Export or the end of its session)"));
  }
  Deposit d = std::move(it->second.d);
  by_token_.erase(it);
  return d;
}

void RangeDeposits::DropSession(uint64_t session) {
  std::vector<UniqueFd> closing;  // closed after mu_ is released
  absl::MutexLock l(&mu_);
  for (auto it = by_token_.begin(); it != by_token_.end();) {
    if (it->second.session == session) {
      closing.push_back(std::move(it->second.d.fd));
      closing.push_back(std::move(it->second.d.object));
      it = by_token_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace svm::service
