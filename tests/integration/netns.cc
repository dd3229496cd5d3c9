#include "tests/integration/netns.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tests/integration/harness.h"

namespace svm::testing {
namespace {

constexpr char kIp[] = "/usr/sbin/ip";
constexpr char kTc[] = "/usr/sbin/tc";
constexpr char kNft[] = "/usr/sbin/nft";
constexpr char kNsPrefix[] = "svmnet-";
constexpr char kBridgePrefix[] = "svb";

absl::Status Run(std::vector<std::string> argv) {
  RunResult r = RunCommand(argv, absl::Seconds(20));
  if (r.exit_code != 0) {
    return absl::InternalError(absl::StrCat(absl::StrJoin(argv, " "), ": ", r.err));
  }
  return absl::OkStatus();
}

// Whether the process that named a leftover (pid in hex) is gone.
bool OwnerGone(absl::string_view hex_pid) {
  uint32_t pid = 0;
  if (!absl::SimpleHexAtoi(hex_pid, &pid) || pid == 0) return false;
  return kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// Removes namespaces and bridges left by test processes that no longer run
// (a test killed by ctest's timeout never reaches its destructors).
void SweepLeftovers() {
  RunResult ns = RunCommand({kIp, "netns", "list"});
  for (absl::string_view line : absl::StrSplit(ns.out, '\n', absl::SkipEmpty())) {
    const std::string name(line.substr(0, line.find(' ')));
    absl::string_view rest = name;
    if (!absl::ConsumePrefix(&rest, kNsPrefix)) continue;
    if (OwnerGone(rest.substr(0, rest.find('-')))) (void)Run({kIp, "netns", "del", name});
  }
  RunResult br = RunCommand({kIp, "-o", "link", "show", "type", "bridge"});
  for (absl::string_view line : absl::StrSplit(br.out, '\n', absl::SkipEmpty())) {
    // "N: NAME: <...> ..."
    std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(": ", 2));
    if (f.size() < 2) continue;
    absl::string_view name = f[1];
    if (!absl::StartsWith(name, kBridgePrefix) || name.size() != 11) continue;
    if (OwnerGone(name.substr(3, 6))) (void)Run({kIp, "link", "del", std::string(name)});
  }
}

}  // namespace

std::string Fabric::Unsupported() {
  if (geteuid() != 0) return "network namespaces need root";
  if (access(kIp, X_OK) != 0) return absl::StrCat(kIp, " (iproute2) is not installed");
  if (access(kTc, X_OK) != 0) return absl::StrCat(kTc, " (iproute2) is not installed");
  if (access(kNft, X_OK) != 0) return absl::StrCat(kNft, " (nftables) is not installed");
  return "";
}

absl::StatusOr<std::unique_ptr<Fabric>> Fabric::Create() {
  static std::atomic<int> fabrics{0};
  SweepLeftovers();
  auto f = std::unique_ptr<Fabric>(new Fabric());
  f->seq_ = fabrics++ % 256;
  f->bridge_ = absl::StrFormat("%s%06x%02x", kBridgePrefix, getpid(), f->seq_);
  if (auto st = Run({kIp, "link", "add", f->bridge_, "type", "bridge"}); !st.ok()) {
    f->bridge_.clear();
    return st;
  }
  if (auto st = Run({kIp, "link", "set", f->bridge_, "up"}); !st.ok()) return st;
  return f;
}

Fabric::~Fabric() {
  for (const Node& n : nodes_) (void)Run({kIp, "netns", "del", n.netns});
  if (!bridge_.empty()) (void)Run({kIp, "link", "del", bridge_});
}

absl::StatusOr<Fabric::Node> Fabric::AddNode() {
  const int k = static_cast<int>(nodes_.size());
  if (k >= 250) return absl::ResourceExhaustedError("a fabric holds 250 nodes");
  Node n;
  n.netns = absl::StrFormat("%s%06x-%02x-%02x", kNsPrefix, getpid(), seq_, k);
  n.host_veth = absl::StrFormat("svv%06x%02x%02x", getpid(), seq_, k);
  n.addr = absl::StrCat("10.78.0.", k + 2);
  if (auto st = Run({kIp, "netns", "add", n.netns}); !st.ok()) return st;
  nodes_.push_back(n);  // deleted by the destructor from here on
  for (std::vector<std::string> cmd : std::vector<std::vector<std::string>>{
           {kIp, "link", "add", n.host_veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns},
           {kIp, "link", "set", n.host_veth, "master", bridge_, "up"},
           {kIp, "-n", n.netns, "addr", "add", n.addr + "/24", "dev", "eth0"},
           {kIp, "-n", n.netns, "link", "set", "eth0", "up"},
           {kIp, "-n", n.netns, "link", "set", "lo", "up"}}) {
    if (auto st = Run(cmd); !st.ok()) return st;
  }
  return n;
}

absl::Status Fabric::Netem(const Node& node, const std::vector<std::string>& args) {
  for (std::vector<std::string> cmd : {std::vector<std::string>{kTc, "qdisc", "replace", "dev", node.host_veth},
                                       std::vector<std::string>{kTc, "-n", node.netns, "qdisc", "replace", "dev", "eth0"}}) {
    cmd.push_back("root");
    cmd.push_back("netem");
    cmd.insert(cmd.end(), args.begin(), args.end());
    if (auto st = Run(cmd); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status Fabric::Rate(const Node& node, const std::string& rate) {
  for (std::vector<std::string> cmd : {std::vector<std::string>{kTc, "qdisc", "replace", "dev", node.host_veth},
                                       std::vector<std::string>{kTc, "-n", node.netns, "qdisc", "replace", "dev", "eth0"}}) {
    for (const char* arg : {"root", "tbf", "rate", rate.c_str(), "burst", "32kb", "latency", "1s"}) cmd.push_back(arg);
    if (auto st = Run(cmd); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status Fabric::Drop(const Node& node, int percent) {
  (void)Run({kIp, "netns", "exec", node.netns, kNft, "delete", "table", "inet", "svmfault"});
  if (percent <= 0) return absl::OkStatus();
  const std::string verdict =
      percent >= 100 ? "drop" : absl::StrCat("numgen random mod 100 < ", percent, " drop");
  const std::string rules = absl::StrCat(
      "table inet svmfault {\n"
      "  chain in { type filter hook input priority 0; policy accept; iifname \"eth0\" ", verdict, "; }\n"
      "  chain out { type filter hook output priority 0; policy accept; oifname \"eth0\" ", verdict, "; }\n"
      "}\n");
  std::string path = absl::StrCat("/tmp/svm-nft-", node.netns, ".nft");
  {
    std::ofstream out(path);
    out << rules;
  }
  absl::Status st = Run({kIp, "netns", "exec", node.netns, kNft, "-f", path});
  unlink(path.c_str());
  return st;
}

absl::Status Fabric::Heal(const Node& node) {
  (void)Run({kTc, "qdisc", "del", "dev", node.host_veth, "root"});  // nothing to delete is fine
  (void)Run({kTc, "-n", node.netns, "qdisc", "del", "dev", "eth0", "root"});
  return Drop(node, 0);
}

std::string Fabric::NetemUnsupported() {
  if (std::string why = Unsupported(); !why.empty()) return why;
  const std::string dev = absl::StrFormat("svp%06x", getpid());
  if (!Run({kIp, "link", "add", dev, "type", "veth", "peer", "name", dev + "p"}).ok()) {
    return "cannot create a veth to probe netem";
  }
  RunResult r = RunCommand({kTc, "qdisc", "add", "dev", dev, "root", "netem", "delay", "1ms"});
  (void)Run({kIp, "link", "del", dev});
  if (r.exit_code == 0) return "";
  return absl::StrCat("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): ", r.err);
}

absl::StatusOr<std::unique_ptr<NetCluster>> NetCluster::Start(
    const std::string& dir, int n, const std::vector<std::string>& exporter_extra,
    const std::vector<std::string>& importer_extra) {
  auto c = std::make_unique<NetCluster>();
  auto f = Fabric::Create();
  if (!f.ok()) return f.status();
  c->fabric = std::move(*f);
  auto node = c->fabric->AddNode();
  if (!node.ok()) return node.status();
  c->exporter_node = *node;
  auto a = Daemon::Start({.node = "A", .dir = dir, .extra = exporter_extra, .transport = "tcp",
                          .netns = node->netns, .host = node->addr});
  if (!a.ok()) return a.status();
  c->exporter = std::move(*a);
  for (int i = 1; i <= n; ++i) {
    node = c->fabric->AddNode();
    if (!node.ok()) return node.status();
    c->importer_nodes.push_back(*node);
    auto b = Daemon::Start({.node = absl::StrCat("B", i), .dir = dir, .extra = importer_extra,
                            .transport = "tcp", .netns = node->netns, .host = node->addr});
    if (!b.ok()) return b.status();
    c->importers.push_back(std::move(*b));
  }
  return c;
}

}  // namespace svm::testing
