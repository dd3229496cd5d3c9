// A third-party program using the installed libsvm: connects to svmd and
// prints its node and version (or the error, e.g. UNAVAILABLE without a
// daemon). Built by CMakeLists.txt (find_package(svm)) or Makefile
// (pkg-config svm).
#include <cstdio>
#include <string>

#include "svm/client.h"

int main(int argc, char** argv) {
  const std::string daemon = argc > 1 ? argv[1] : "unix:/run/svm/svmd.sock";
  auto client = svm::Client::Connect(daemon);
  if (!client.ok()) {
    std::fprintf(stderr, "svm_hello: %s\n", client.status().ToString().c_str());
    return 1;
  }
  auto status = (*client)->Status();
  if (!status.ok()) {
    std::fprintf(stderr, "svm_hello: %s\n", status.status().ToString().c_str());
    return 1;
  }
  std::printf("svmd %s on node %s\n", status->version.c_str(), status->node.c_str());
  return 0;
}
