// svm-remote-client UNIX_CONTROL: the client half of a daemon on another
// machine (the two-guest VM tier, harness.h: SVM_TEST_REMOTE). A Client
// talks to its own machine's svmd only (the session's rings are shared
// memory), so the test harness on node A drives a Client on node B through
// this program, run there by the node agent: one request a line on stdin,
// fields separated by tabs; one answer a line on stdout: "ok" and
// base64-encoded fields separated by spaces, or "err CODE B64(MESSAGE)".
//   status | exports | imports | unexport N | import PEER N AS
//   read N OFFSET LEN FRESH | map N (all of it, through a mapping kept
//   for the connection) | sync N
//   watch N | next TIMEOUT_MS (the watch of this connection)
#include <cstdio>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/proto_convert.h"
#include "svm/client.h"

namespace {

std::string B64(const std::string& s) { return absl::Base64Escape(s); }

std::string Err(const absl::Status& st) {
  return absl::StrCat("err ", static_cast<int>(st.code()), " ", B64(std::string(st.message())));
}

template <typename M>
std::string Ok(const absl::StatusOr<M>& m) {
  return m.ok() ? absl::StrCat("ok ", B64(svm::internal::ToProto(*m).SerializeAsString())) : Err(m.status());
}

template <typename M>
std::string OkList(const absl::StatusOr<std::vector<M>>& l) {
  if (!l.ok()) return Err(l.status());
  std::string out = "ok";
  for (const auto& m : *l) absl::StrAppend(&out, " ", B64(svm::internal::ToProto(m).SerializeAsString()));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: svm-remote-client unix:CONTROL\n");
    return 2;
  }
  auto c = svm::Client::Connect(argv[1]);
  if (!c.ok()) {
    std::printf("%s\n", Err(c.status()).c_str());
    return 1;
  }
  std::printf("ok\n");
  std::fflush(stdout);
  std::unique_ptr<svm::WatchStream> watch;
  std::map<std::string, std::unique_ptr<svm::Mapping>> maps;
  std::string line;
  while (std::getline(std::cin, line)) {
    std::vector<std::string> f = absl::StrSplit(line, '\t');
    const std::string& cmd = f[0];
    auto arg = [&](size_t i) { return i < f.size() ? f[i] : std::string(); };
    auto num = [&](size_t i) {
      uint64_t v = 0;
      (void)absl::SimpleAtoi(arg(i), &v);
      return v;
    };
    std::string out;
    if (cmd == "status") {
      out = Ok((*c)->Status());
    } else if (cmd == "exports") {
      out = OkList((*c)->ListExports());
    } else if (cmd == "imports") {
      out = OkList((*c)->ListImports());
    } else if (cmd == "unexport") {
      auto st = (*c)->Unexport(arg(1));
      out = st.ok() ? "ok" : Err(st);
    } else if (cmd == "import") {
      out = Ok((*c)->Import(arg(1), arg(2), arg(3)));
    } else if (cmd == "sync") {
      out = Ok((*c)->Sync(arg(1)));
    } else if (cmd == "read") {
      std::string buf(num(3), '\0');
      svm::ReadOptions o;
      o.fresh = arg(4) == "1";
      auto r = (*c)->Read(arg(1), num(2),
                          absl::MakeSpan(reinterpret_cast<uint8_t*>(buf.data()), buf.size()), o);
      out = r.ok() ? absl::StrCat("ok ", r->len, " ", r->seq, " ", r->pages_from_cache, " ",
                                  r->pages_fetched, " ", B64(buf))
                   : Err(r.status());
    } else if (cmd == "map") {  // all of a mapping of the import (kept), faulted in at once
      auto& m = maps[arg(1)];
      if (!m) {
        auto mm = (*c)->Map(arg(1));
        if (mm.ok()) m = std::move(*mm);
        else out = Err(mm.status());
      }
      if (!m) {
        maps.erase(arg(1));
      } else if (auto st = m->Prefetch(0, m->size()); !st.ok()) {
        out = Err(st);
      } else {
        out = absl::StrCat("ok ", m->pages_fetched(), " ",
                           B64(std::string(reinterpret_cast<const char*>(m->data()), m->size())));
      }
    } else if (cmd == "watch") {
      auto w = (*c)->Watch(arg(1));
      if (w.ok()) watch = std::move(*w);
      out = w.ok() ? "ok" : Err(w.status());
    } else if (cmd == "next") {
      if (!watch) {
        out = Err(absl::FailedPreconditionError("no watch"));
      } else {
        out = Ok(watch->Next(absl::Milliseconds(num(1))));
      }
    } else {
      out = Err(absl::InvalidArgumentError(absl::StrCat("unknown request ", cmd)));
    }
    std::printf("%s\n", out.c_str());
    std::fflush(stdout);
  }
  return 0;
}
