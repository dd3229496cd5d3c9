# ThreadSanitizer builds only (SVM_TSAN_ABSL, set by run-sanitized.sh tsan):
# svm_tsan_absl tells TSan about absl::Mutex, CondVar, Notification and
# BlockingCounter, which Debian builds without TSan (tsan_absl.cc says how).
# It is linked first into every target defined after this file is included,
# so every executable's lookup scope finds it before libabsl_synchronization,
# for svm's calls and for gRPC's and abseil's own.
add_library(svm_tsan_absl SHARED ${CMAKE_CURRENT_LIST_DIR}/tsan_absl.cc)
# Not instrumented itself (its accesses are abseil's, not svm's); linked with
# libtsan for the __tsan_* annotation calls.
target_compile_options(svm_tsan_absl PRIVATE -fno-sanitize=thread)
target_link_options(svm_tsan_absl PRIVATE -fsanitize=thread)
target_link_libraries(svm_tsan_absl PRIVATE absl::synchronization ${CMAKE_DL_LIBS})
# link_libraries: built before every target and linked into it
# (BUILD_INTERFACE: not part of the installed targets, svmTargets). That alone
# can leave libabsl_synchronization ahead of it on an executable's link line,
# when a static library brings abseil in (svmd): the link option puts it
# before every object and library, so it is the first NEEDED entry.
link_libraries($<BUILD_INTERFACE:svm_tsan_absl>)
add_link_options($<TARGET_FILE:svm_tsan_absl>)
