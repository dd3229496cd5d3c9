// A private network for integration tests: one Linux bridge, and per node a
// network namespace joined to it by a veth pair, each with its own address
// (10.78.0.2, .3, ... /24 on the namespace's eth0). svmd runs inside a node's
// namespace (Daemon::Options::netns); the test process stays in the root
// namespace and reaches the daemons through their unix sockets, which the
// filesystem, not the network namespace, names. The bridge has no address in
// the root namespace, so fabrics of tests running in parallel never share a
// route; every name carries the test process's pid and a sequence number.
//
// Faults on a node's link (its traffic to and from everyone): Drop() and
// Partition() drop packets with nftables in its namespace, Netem() puts a
// `tc netem` qdisc on both ends of its veth (delay, jitter, reordering),
// Rate() a token bucket (a slow link), Heal() removes them.
//
// Lifetime: the destructor deletes the namespaces (their veths go with them)
// and the bridge; start daemons after the fabric so they die first. Create()
// also removes what a crashed earlier test process (whose pid is gone) left.
#ifndef SVM_TESTS_INTEGRATION_NETNS_H_
#define SVM_TESTS_INTEGRATION_NETNS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/integration/harness.h"

namespace svm::testing {

class Fabric {
 public:
  struct Node {
    std::string netns;      // namespace name (ip netns), for Daemon::Options::netns
    std::string addr;       // its address, for Daemon::Options::host
    std::string host_veth;  // the veth end on the bridge (root namespace)
  };
  // Why the fabric cannot be built here (not root, no `ip`, `tc` or `nft`), or "". Tests
  // skip on a non-empty answer; as root with iproute2 they must run.
  static std::string Unsupported();
  static absl::StatusOr<std::unique_ptr<Fabric>> Create();
  ~Fabric();

  absl::StatusOr<Node> AddNode();
  // Drops percent % of the node's packets on its eth0, in both directions
  // (nftables in its namespace: `numgen random`); 100 is a partition.
  absl::Status Drop(const Node& node, int percent);
  absl::Status Partition(const Node& node) { return Drop(node, 100); }
  // `tc qdisc replace ... netem ARGS` on both ends of node's veth (delay,
  // jitter, reordering); needs sch_netem in the kernel (NetemUnsupported).
  absl::Status Netem(const Node& node, const std::vector<std::string>& args);
  // A slow link: `tc qdisc replace ... tbf rate RATE` (a token bucket, no
  // netem needed) on both ends of node's veth, e.g. "8mbit".
  absl::Status Rate(const Node& node, const std::string& rate);
  // Removes every fault from node's link.
  absl::Status Heal(const Node& node);
  // Why this kernel cannot run netem ("" when it can): some (the CI host's)
  // are built without CONFIG_NET_SCH_NETEM.
  static std::string NetemUnsupported();

 private:
  Fabric() = default;
  int seq_ = 0;
  std::string bridge_;
  std::vector<Node> nodes_;
};

// An exporting daemon and n importing daemons (nodes "A", "B1".."Bn"), tcp,
// each in its own namespace of one fabric. Declaration order is teardown
// order: the daemons die before their namespaces go.
struct NetCluster {
  std::unique_ptr<Fabric> fabric;
  Fabric::Node exporter_node;
  std::vector<Fabric::Node> importer_nodes;
  std::unique_ptr<Daemon> exporter;
  std::vector<std::unique_ptr<Daemon>> importers;

  static absl::StatusOr<std::unique_ptr<NetCluster>> Start(
      const std::string& dir, int n, const std::vector<std::string>& exporter_extra = {},
      const std::vector<std::string>& importer_extra = {});
};

}  // namespace svm::testing

#endif  // SVM_TESTS_INTEGRATION_NETNS_H_
