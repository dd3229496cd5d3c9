// svm/svm.h: the C API over svm::Client.
#include "svm/svm.h"

#include <memory>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "svm/client.h"

struct svm_client {
  std::unique_ptr<svm::Client> c;
};
struct svm_mapping {
  std::unique_ptr<svm::Mapping> m;
};
struct svm_watch_stream {
  std::unique_ptr<svm::WatchStream> w;
};

namespace {

thread_local std::string last_error;

int Fail(const absl::Status& st) {
  last_error = absl::StrCat(absl::StatusCodeToString(st.code()), ": ", st.message());
  return static_cast<int>(st.code());
}

int FailArg(const char* what) { return Fail(absl::InvalidArgumentError(what)); }

// Every entry point catches what C++ could throw (allocation failure):
// nothing unwinds into C.
template <typename F>
int Guard(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return Fail(absl::ResourceExhaustedError("out of memory"));
  } catch (...) {
    return Fail(absl::InternalError("unexpected exception in libsvm"));
  }
}

}  // namespace

extern "C" {

const char* svm_last_error(void) { return last_error.c_str(); }

const char* svm_code_name(int code) {
  static thread_local std::string name;
  name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  return name.c_str();
}

int svm_connect(const char* target, svm_client** out) {
  if (target == nullptr || out == nullptr) return FailArg("svm_connect: target and out are required");
  *out = nullptr;
  return Guard([&] {
    auto c = svm::Client::Connect(target);
    if (!c.ok()) return Fail(c.status());
    *out = new svm_client{std::move(*c)};
    return 0;
  });
}

void svm_disconnect(svm_client* c) { delete c; }

int svm_export(svm_client* c, const char* name, const void* addr, size_t len) {
  if (c == nullptr || name == nullptr) return FailArg("svm_export: client and name are required");
  return Guard([&] {
    auto r = c->c->Export(name, addr, len);
    return r.ok() ? 0 : Fail(r.status());
  });
}

int svm_export_allow(svm_client* c, const char* name, const void* addr, size_t len,
                     const char* const* allow, size_t nallow) {
  if (c == nullptr || name == nullptr || (allow == nullptr && nallow != 0)) {
    return FailArg("svm_export_allow: client, name and allow (when nallow > 0) are required");
  }
  return Guard([&] {
    svm::ExportOptions o;
    for (size_t i = 0; i < nallow; ++i) {
      if (allow[i] == nullptr) return FailArg("svm_export_allow: a NULL identity");
      o.allow.emplace_back(allow[i]);
    }
    auto r = c->c->Export(name, addr, len, o);
    return r.ok() ? 0 : Fail(r.status());
  });
}

int svm_export_pid(svm_client* c, const char* name, pid_t pid, uint64_t addr, uint64_t len) {
  if (c == nullptr || name == nullptr) return FailArg("svm_export_pid: client and name are required");
  return Guard([&] {
    auto r = c->c->ExportPid(name, pid, addr, len);
    return r.ok() ? 0 : Fail(r.status());
  });
}

int svm_unexport(svm_client* c, const char* name) {
  if (c == nullptr || name == nullptr) return FailArg("svm_unexport: client and name are required");
  return Guard([&] {
    auto st = c->c->Unexport(name);
    return st.ok() ? 0 : Fail(st);
  });
}

int svm_import(svm_client* c, const char* peer, const char* name, const char* as_name, uint64_t* len_out) {
  if (c == nullptr || peer == nullptr || name == nullptr) {
    return FailArg("svm_import: client, peer and name are required");
  }
  return Guard([&] {
    auto r = c->c->Import(peer, name, as_name == nullptr ? "" : as_name);
    if (!r.ok()) return Fail(r.status());
    if (len_out != nullptr) *len_out = r->len;
    return 0;
  });
}

int svm_read(svm_client* c, const char* name, uint64_t offset, void* dst, size_t len, unsigned flags,
             svm_read_result* result) {
  if (c == nullptr || name == nullptr || (dst == nullptr && len > 0)) {
    return FailArg("svm_read: client, name and dst are required");
  }
  if ((flags & ~SVM_READ_FRESH) != 0) return FailArg("svm_read: unknown flags");
  return Guard([&] {
    svm::ReadOptions o;
    o.fresh = (flags & SVM_READ_FRESH) != 0;
    auto r = c->c->Read(name, offset, absl::MakeSpan(static_cast<uint8_t*>(dst), len), o);
    if (!r.ok()) return Fail(r.status());
    if (result != nullptr) {
      result->len = r->len;
      result->seq = r->seq;
      result->pages_from_cache = r->pages_from_cache;
      result->pages_fetched = r->pages_fetched;
    }
    return 0;
  });
}

int svm_map(svm_client* c, const char* name, size_t readahead_pages, svm_mapping** out) {
  if (c == nullptr || name == nullptr || out == nullptr) return FailArg("svm_map: client, name and out are required");
  *out = nullptr;
  return Guard([&] {
    svm::MapOptions o;
    o.readahead_pages = readahead_pages;
    auto m = c->c->Map(name, o);
    if (!m.ok()) return Fail(m.status());
    *out = new svm_mapping{std::move(*m)};
    return 0;
  });
}

const uint8_t* svm_mapping_data(const svm_mapping* m) { return m == nullptr ? nullptr : m->m->data(); }

size_t svm_mapping_size(const svm_mapping* m) { return m == nullptr ? 0 : m->m->size(); }

int svm_mapping_prefetch(svm_mapping* m, uint64_t offset, uint64_t len) {
  if (m == nullptr) return FailArg("svm_mapping_prefetch: mapping is required");
  return Guard([&] {
    auto st = m->m->Prefetch(offset, len);
    return st.ok() ? 0 : Fail(st);
  });
}

void svm_unmap(svm_mapping* m) { delete m; }

int svm_watch(svm_client* c, const char* name, svm_watch_stream** out) {
  if (c == nullptr || name == nullptr || out == nullptr) return FailArg("svm_watch: client, name and out are required");
  *out = nullptr;
  return Guard([&] {
    auto w = c->c->Watch(name);
    if (!w.ok()) return Fail(w.status());
    *out = new svm_watch_stream{std::move(*w)};
    return 0;
  });
}

int svm_watch_next(svm_watch_stream* w, int64_t timeout_ms, svm_invalidation* out) {
  if (w == nullptr || out == nullptr) return FailArg("svm_watch_next: watch and out are required");
  if (timeout_ms < 0) return FailArg("svm_watch_next: timeout_ms must be >= 0");
  return Guard([&] {
    auto e = w->w->Next(absl::Milliseconds(timeout_ms));
    if (!e.ok()) return Fail(e.status());
    *out = svm_invalidation{};
    out->first_page = e->first_page;
    out->npages = e->npages;
    out->seq = e->seq;
    out->kind = static_cast<uint32_t>(e->kind);
    out->detected_ns = e->detected_ns;
    out->received_ns = e->received_ns;
    return 0;
  });
}

void svm_watch_close(svm_watch_stream* w) { delete w; }

int svm_sync(svm_client* c, const char* name) {
  if (c == nullptr || name == nullptr) return FailArg("svm_sync: client and name are required");
  return Guard([&] {
    auto r = c->c->Sync(name);
    return r.ok() ? 0 : Fail(r.status());
  });
}

}  // extern "C"
