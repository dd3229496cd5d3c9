# Debian packages with CPack DEB (scripts/package.sh runs this):
#   svm        component daemon: svmd, svmctl, the unit, sysusers, tmpfiles,
#              udev rule, modules-load, /etc/svm/svmd.conf, man pages, docs
#   svm-dkms   component dkms:   the module source and dkms.conf
#   libsvm-dev component dev:    headers, libsvm.a + libsvm_proto.a, svm.pc,
#                                the CMake package svm
# Packages are built from an install with prefix /usr staged through DESTDIR
# (CPACK_SET_DESTDIR), so the install-time rendering of the unit and the
# configuration file (deploy/CMakeLists.txt) sees the final prefix.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME svm)
set(CPACK_PACKAGE_VENDOR "svm")
set(SVM_DEB_MAINTAINER "svm maintainers <svm-maintainers@example.org>" CACHE STRING
    "Maintainer: of the Debian packages (and their changelog)")
set(CPACK_PACKAGE_CONTACT "${SVM_DEB_MAINTAINER}")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_SET_DESTDIR ON)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL daemon dkms dev)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "${CPACK_PACKAGE_CONTACT}")
set(CPACK_DEBIAN_PACKAGE_SECTION misc)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)

set(deb ${PROJECT_SOURCE_DIR}/deploy/debian)
set(deb_out ${PROJECT_BINARY_DIR}/debian)

# svm: the daemon and CLI.
set(CPACK_DEBIAN_DAEMON_PACKAGE_NAME svm)
set(CPACK_DEBIAN_DAEMON_PACKAGE_SECTION net)
set(CPACK_DEBIAN_DAEMON_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_DAEMON_PACKAGE_RECOMMENDS "svm-dkms")
set(CPACK_DEBIAN_DAEMON_DESCRIPTION "shared virtual memory daemon over RDMA and TCP
svmd lets a process export a range of its address space; remote nodes
import the export and read the live memory, and are invalidated whenever
the exporting process's mapping changes. svmctl is the operator command
line. The svmd service listens for peers on port 7470 with peer
authentication off until a token is configured (see svmd(8)).")
configure_file(${deb}/svm.postinst ${deb_out}/svm/postinst @ONLY)
configure_file(${deb}/svm.prerm ${deb_out}/svm/prerm @ONLY)
configure_file(${deb}/svm.postrm ${deb_out}/svm/postrm @ONLY)
configure_file(${deb}/svm.conffiles ${deb_out}/svm/conffiles COPYONLY)
set(CPACK_DEBIAN_DAEMON_PACKAGE_CONTROL_EXTRA
    ${deb_out}/svm/postinst ${deb_out}/svm/prerm ${deb_out}/svm/postrm ${deb_out}/svm/conffiles)
set(CPACK_DEBIAN_DAEMON_PACKAGE_CONTROL_STRICT_PERMISSION ON)

# svm-dkms: the kernel module source.
set(CPACK_DEBIAN_DKMS_PACKAGE_NAME svm-dkms)
set(CPACK_DEBIAN_DKMS_PACKAGE_SECTION kernel)
set(CPACK_DEBIAN_DKMS_PACKAGE_ARCHITECTURE all)
set(CPACK_DEBIAN_DKMS_PACKAGE_DEPENDS "dkms")
set(CPACK_DEBIAN_DKMS_DESCRIPTION "svm driver shim kernel module source (DKMS)
svm_shim gives svmd a notifier-backed view of a process's memory through
/dev/svm_shim (hmm_range_fault and an mmu interval notifier). DKMS builds
it for every installed kernel with headers; without it svmd uses procfs.")
configure_file(${deb}/svm-dkms.postinst ${deb_out}/svm-dkms/postinst @ONLY)
configure_file(${deb}/svm-dkms.prerm ${deb_out}/svm-dkms/prerm @ONLY)
set(CPACK_DEBIAN_DKMS_PACKAGE_CONTROL_EXTRA ${deb_out}/svm-dkms/postinst ${deb_out}/svm-dkms/prerm)
set(CPACK_DEBIAN_DKMS_PACKAGE_CONTROL_STRICT_PERMISSION ON)

# libsvm-dev: the client library for third parties.
set(CPACK_DEBIAN_DEV_PACKAGE_NAME libsvm-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS "libgrpc++-dev, libprotobuf-dev, libabsl-dev")
set(CPACK_DEBIAN_DEV_DESCRIPTION "client library for svmd (development files)
libsvm is the C++ client library of svmd: export this process's memory,
import remote exports, read them live, watch invalidations, Sync. This
package holds the headers, the static libraries, svm.pc for pkg-config and
the CMake package svm (find_package(svm), target svm::svm).")

# copyright and changelog in /usr/share/doc/PACKAGE of each package.
foreach(c daemon dkms dev)
  string(TOUPPER ${c} C)
  set(pkg ${CPACK_DEBIAN_${C}_PACKAGE_NAME})
  set(SVM_DEB_PACKAGE ${pkg})
  configure_file(${deb}/changelog.in ${deb_out}/${pkg}/changelog @ONLY)
  install(CODE "execute_process(COMMAND gzip -9nf \"${deb_out}/${pkg}/changelog\" -c
                                OUTPUT_FILE \"${deb_out}/${pkg}/changelog.gz\")"
          COMPONENT ${c})
  install(FILES ${deb_out}/${pkg}/changelog.gz ${deb}/copyright
          DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/${pkg} COMPONENT ${c})
endforeach()

include(CPack)
