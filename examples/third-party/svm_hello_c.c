/* The C API of the installed libsvm (svm/svm.h): connects to svmd and
 * reads the first bytes of an import named on the command line, or says
 * why it cannot (e.g. UNAVAILABLE without a daemon).
 * usage: svm_hello_c [unix:/run/svm/svmd.sock [IMPORT]] */
#include <stdio.h>

#include "svm/svm.h"

int main(int argc, char** argv) {
  const char* daemon = argc > 1 ? argv[1] : "unix:/run/svm/svmd.sock";
  svm_client* c = NULL;
  if (svm_connect(daemon, &c) != SVM_OK) {
    fprintf(stderr, "svm_hello_c: %s\n", svm_last_error());
    return 1;
  }
  int rc = 0;
  if (argc > 2) {
    unsigned char buf[16];
    svm_read_result r;
    if (svm_read(c, argv[2], 0, buf, sizeof(buf), 0, &r) != SVM_OK) {
      fprintf(stderr, "svm_hello_c: %s\n", svm_last_error());
      rc = 1;
    } else {
      for (size_t i = 0; i < sizeof(buf); ++i) printf("%02x", buf[i]);
      printf(" (seq %llu)\n", (unsigned long long)r.seq);
    }
  } else {
    printf("connected to %s\n", daemon);
  }
  svm_disconnect(c);
  return rc;
}
