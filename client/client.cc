#include "svm/client.h"

#include <grpcpp/grpcpp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>


#include "absl/base/thread_annotations.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "client/proto_convert.h"
#include "client/range_fd.h"
#include "client/session.h"
#include "svm/v1/control.grpc.pb.h"

namespace svm {
namespace {

constexpr uint64_t kPageSize = session::abi::kPageSize;

// CLOCK_MONOTONIC through the vDSO: no system call.
int64_t MonotonicNs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// Whether the import's cache may serve: the importer's lease on the exporter
// holds (an importer the exporter gave up on must not serve it).
bool CacheServes(const internal::View& v) {
  return v.kind == session::abi::kImport &&
         MonotonicNs() < v.header->lease_until_ns.load(std::memory_order_acquire);
}

// Copies the cached pages of [offset, offset + dst.size()) into dst and
// counts them in *hits. Byte ranges of pages not cached are appended to
// *missing (merged when adjacent); without missing, it stops at the first
// such page and returns false.
bool CopyCached(const internal::View& v, uint64_t offset, absl::Span<uint8_t> dst, uint64_t* hits,
                std::vector<std::pair<uint64_t, uint64_t>>* missing) {
  const uint64_t end = offset + dst.size();
  for (uint64_t p = offset / kPageSize; p * kPageSize < end; ++p) {
    const uint64_t a = std::max(offset, p * kPageSize);
    const uint64_t b = std::min(end, (p + 1) * kPageSize);
    uint64_t version;
    if (session::abi::TryCopyPage(&v.words[p], v.data + a, dst.data() + (a - offset), b - a, &version)) {
      ++*hits;
    } else if (missing == nullptr) {
      return false;
    } else if (!missing->empty() && missing->back().second == a) {
      missing->back().second = b;
    } else {
      missing->emplace_back(a, b);
    }
  }
  return true;
}

// A watch through the session's event ring.
class SessionWatch final : public WatchStream {
 public:
  SessionWatch(internal::Session* session, uint32_t id, std::string name)
      : session_(session), id_(id), name_(std::move(name)) {}
  ~SessionWatch() override { session_->ForgetWatch(id_); }

  absl::StatusOr<Invalidation> Next(absl::Duration timeout) override {
    auto e = session_->NextEvent(id_, timeout);
    if (!e.ok()) return e.status();
    Invalidation ev;
    ev.name = name_;
    ev.first_page = e->first_page;
    ev.npages = e->npages;
    ev.seq = e->seq;
    ev.kind = static_cast<InvalidationKind>(e->kind);
    ev.detected_ns = e->detected_ns;
    ev.received_ns = e->received_ns;
    return ev;
  }

 private:
  internal::Session* const session_;
  const uint32_t id_;
  const std::string name_;
};

class MappingImpl final : public Mapping {
 public:
  MappingImpl(internal::Session* session, std::shared_ptr<internal::MappedRange> r)
      : session_(session), r_(std::move(r)) {}
  ~MappingImpl() override { session_->UnmapRange(r_); }
  const uint8_t* data() const override { return r_->base; }
  size_t size() const override { return r_->view->len; }
  absl::Status Prefetch(uint64_t offset, uint64_t len) override {
    if (offset > size() || len > size() - offset) {
      return absl::OutOfRangeError(absl::StrFormat("prefetch of %u bytes at %u is past the end (%u bytes)",
                                                   len, offset, size()));
    }
    if (len == 0) return absl::OkStatus();
    const uint64_t first = offset / kPageSize;
    const uint64_t last = (offset + len - 1) / kPageSize;
    auto st = session_->FetchPages(*r_->view, first, last - first + 1);
    if (!st.ok()) return st;
    r_->fetched.fetch_add(last - first + 1, std::memory_order_relaxed);
    // Map what svmd installed into this mapping's page tables now, so the
    // first pass over it takes no minor faults (a page dropped meanwhile
    // faults through the pager as usual).
    ::madvise(const_cast<uint8_t*>(r_->base) + first * kPageSize, (last - first + 1) * kPageSize,
              MADV_POPULATE_READ);
    return absl::OkStatus();
  }
  uint64_t faults() const override { return r_->faults.load(std::memory_order_relaxed); }
  uint64_t pages_fetched() const override { return r_->fetched.load(std::memory_order_relaxed); }

 private:
  internal::Session* const session_;
  std::shared_ptr<internal::MappedRange> r_;
};

class GrpcClient final : public Client {
 public:
  explicit GrpcClient(std::shared_ptr<grpc::Channel> ch) : stub_(v1::Control::NewStub(ch)) {}

  absl::Status OpenSession(const std::string& path) {
    auto s = internal::Session::Connect(path);
    if (!s.ok()) return s.status();
    session_ = std::move(*s);
    return absl::OkStatus();
  }

  absl::StatusOr<ExportInfo> Export(const std::string& name, const void* addr, size_t len,
                                    const ExportOptions& opts) override {
    return ExportPid(name, 0, reinterpret_cast<uint64_t>(addr), len, opts);
  }

  absl::StatusOr<ExportInfo> ExportPid(const std::string& name, pid_t pid, uint64_t addr,
                                       uint64_t len, const ExportOptions& opts) override {
    v1::ExportRequest req;
    req.set_name(name);
    req.set_pid(pid);
    req.set_addr(addr);
    req.set_len(len);
    for (const std::string& id : opts.allow) req.add_allow(id);
    // The kernel checks this process's right to the memory (range_fd.h).
    // Memory of this process's own ExportableMemory: its memfd goes along,
    // for the zero-copy path (svmd has the kernel check it).
    const int object = pid == 0 || pid == ::getpid() ? internal::ExportableObjectFd(addr, len) : -1;
    auto token = internal::DepositRange(*session_, pid, addr, len, object);
    if (!token.ok()) return token.status();
    req.set_range_token(*token);
    v1::ExportResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->Export(&ctx, req, &resp)); !st.ok()) return st;
    return internal::FromProto(resp.info());
  }

  absl::Status Unexport(const std::string& name) override {
    v1::UnexportRequest req;
    req.set_name(name);
    v1::UnexportResponse resp;
    grpc::ClientContext ctx;
    return FromGrpc(stub_->Unexport(&ctx, req, &resp));
  }

  absl::StatusOr<std::vector<ExportInfo>> ListExports() override {
    v1::ListExportsResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->ListExports(&ctx, {}, &resp)); !st.ok()) return st;
    std::vector<ExportInfo> out;
    out.reserve(resp.exports_size());
    for (const v1::ExportInfo& e : resp.exports()) out.push_back(internal::FromProto(e));
    return out;
  }

  absl::StatusOr<ImportInfo> Import(const std::string& peer, const std::string& name,
                                    const std::string& as) override {
    v1::ImportRequest req;
    req.set_peer(peer);
    req.set_name(name);
    req.set_as(as);
    v1::ImportResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->Import(&ctx, req, &resp)); !st.ok()) return st;
    return internal::FromProto(resp.info());
  }

  absl::StatusOr<std::vector<ImportInfo>> ListImports() override {
    v1::ListImportsResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->ListImports(&ctx, {}, &resp)); !st.ok()) return st;
    std::vector<ImportInfo> out;
    out.reserve(resp.imports_size());
    for (const v1::ImportInfo& i : resp.imports()) out.push_back(internal::FromProto(i));
    return out;
  }

  absl::StatusOr<ReadResult> Read(const std::string& name, uint64_t offset, absl::Span<uint8_t> dst,
                                  ReadOptions opts) override {
    // The common case first, without allocating: every page cached.
    if (!opts.fresh && !dst.empty() && !session_->forked()) {
      // The view this thread used last, without a lock or a reference count.
      thread_local struct {
        uint64_t session = 0;
        std::string name;
        std::shared_ptr<internal::View> view;
      } last;
      if (last.session != session_->id() || last.name != name || last.view->retired()) {
        auto v = session_->Open(name);
        if (v.ok()) last = {session_->id(), name, *v};
      }
      const internal::View* v = last.session == session_->id() && last.name == name ? last.view.get() : nullptr;
      if (v != nullptr && offset <= v->len && dst.size() <= v->len - offset && CacheServes(*v)) {
        ReadResult res;
        const uint64_t seq = v->header->seq.load(std::memory_order_acquire);
        if (CopyCached(*v, offset, dst, &res.pages_from_cache, nullptr)) {
          session_->CountCacheHits(v->handle, 1, res.pages_from_cache);
          res.len = dst.size();
          res.seq = seq;
          return res;
        }
      }
    }
    ReadOp op{name, offset, dst, opts};
    return std::move(ReadV(absl::MakeConstSpan(&op, 1))[0]);
  }

  std::vector<absl::StatusOr<ReadResult>> ReadV(absl::Span<const ReadOp> ops) override {
    std::vector<absl::StatusOr<ReadResult>> out;
    std::vector<ReadResult> res(ops.size());
    std::vector<absl::Status> err(ops.size());
    std::vector<internal::Session::Op> ring;
    std::vector<size_t> owner;  // ring op -> op
    // The views the ring ops copy from (Session::Op::view) live until Run returned.
    std::vector<std::shared_ptr<internal::View>> views;
    const uint64_t chunk = session_->chunk();
    for (size_t i = 0; i < ops.size(); ++i) {
      const ReadOp& op = ops[i];
      auto v = session_->Open(op.name);
      if (!v.ok()) {
        err[i] = v.status();
        continue;
      }
      const uint64_t len = op.dst.size();
      if (len == 0) {
        err[i] = absl::InvalidArgumentError("len must be > 0");
        continue;
      }
      if (op.offset > (*v)->len || len > (*v)->len - op.offset) {
        err[i] = absl::OutOfRangeError(absl::StrFormat(
            "read of %u bytes at offset %u is past the end of '%s' (%u bytes)", len, op.offset,
            op.name, (*v)->len));
        continue;
      }
      res[i].len = len;
      res[i].seq = UINT64_MAX;
      const uint64_t end = op.offset + len;
      // Byte ranges [first, last) that must come from svmd.
      std::vector<std::pair<uint64_t, uint64_t>> missing;
      const internal::View& view = **v;
      views.push_back(*v);
      if (!op.opts.fresh && CacheServes(view)) {
        const uint64_t seq = view.header->seq.load(std::memory_order_acquire);
        CopyCached(view, op.offset, op.dst, &res[i].pages_from_cache, &missing);
        if (res[i].pages_from_cache > 0) res[i].seq = seq;
        // svmd counts the reads that reach it, with their own pages; this
        // one's cached pages, and the read itself when nothing is missing,
        // only this process knows of.
        session_->CountCacheHits(view.handle, missing.empty() ? 1 : 0, res[i].pages_from_cache);
      } else {
        missing.emplace_back(op.offset, end);
      }
      for (auto [a, b] : missing) {
        for (uint64_t o = a; o < b; o += chunk) {
          internal::Session::Op r;
          r.handle = view.handle;
          r.offset = o;
          r.len = std::min(chunk, b - o);
          r.fresh = op.opts.fresh;
          r.dst = op.dst.data() + (o - op.offset);
          // svmd may leave a cached read's bytes in the shared cache.
          if (!op.opts.fresh && view.kind == session::abi::kImport && view.data != nullptr) r.view = &view;
          ring.push_back(r);
          owner.push_back(i);
        }
      }
    }
    if (!ring.empty()) {
      auto results = session_->Run(ring);
      for (size_t k = 0; k < results.size(); ++k) {
        ReadResult& r = res[owner[k]];
        if (!results[k].status.ok()) {
          if (err[owner[k]].ok()) err[owner[k]] = results[k].status;
          continue;
        }
        r.seq = std::min(r.seq, results[k].seq);
        r.pages_from_cache += results[k].pages_from_cache;
        r.pages_fetched += results[k].pages_fetched;
      }
    }
    out.reserve(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
      if (!err[i].ok()) {
        out.emplace_back(err[i]);
        continue;
      }
      if (res[i].seq == UINT64_MAX) res[i].seq = 0;
      out.emplace_back(res[i]);
    }
    return out;
  }

  absl::StatusOr<std::unique_ptr<Mapping>> Map(const std::string& name, MapOptions opts) override {
    auto v = session_->Open(name);
    if (!v.ok()) return v.status();
    auto r = session_->MapRange(*v, opts.readahead_pages);
    if (!r.ok()) return r.status();
    return std::unique_ptr<Mapping>(std::make_unique<MappingImpl>(session_.get(), std::move(*r)));
  }

  absl::StatusOr<std::unique_ptr<WatchStream>> Watch(const std::string& name) override {
    auto id = session_->Watch(name);
    if (!id.ok()) return id.status();
    return std::unique_ptr<WatchStream>(std::make_unique<SessionWatch>(session_.get(), *id, name));
  }

  absl::StatusOr<SyncResult> Sync(const std::string& name) override {
    v1::SyncRequest req;
    req.set_name(name);
    v1::SyncResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->Sync(&ctx, req, &resp)); !st.ok()) return st;
    return internal::FromProto(resp);
  }

  absl::StatusOr<DaemonStatus> Status() override {
    v1::StatusResponse resp;
    grpc::ClientContext ctx;
    if (auto st = FromGrpc(stub_->Status(&ctx, {}, &resp)); !st.ok()) return st;
    return internal::FromProto(resp);
  }

 private:
  std::unique_ptr<v1::Control::Stub> stub_;
  std::unique_ptr<internal::Session> session_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& target) {
  if (!absl::StartsWith(target, "unix:")) {
    return absl::InvalidArgumentError(absl::StrCat("daemon address must be unix:PATH, got '", target, "'"));
  }
  auto ch = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  if (!ch->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(5))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to svmd at ", target));
  }
  auto client = std::make_unique<GrpcClient>(ch);
  auto status = client->Status();
  if (!status.ok()) return status.status();
  if (status->session_socket.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("svmd at ", target, " offers no session socket (it is older than this libsvm)"));
  }
  if (auto st = client->OpenSession(status->session_socket); !st.ok()) return st;
  // Let the daemon read this process's memory (its exports) even under
  // Yama's restricted ptrace scope.
  if (status->pid > 0) ::prctl(PR_SET_PTRACER, static_cast<unsigned long>(status->pid), 0, 0, 0);
  return std::unique_ptr<Client>(std::move(client));
}

}  // namespace svm
