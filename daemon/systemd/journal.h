// Log lines for the journal: when svmd's stderr is connected to journald
// (systemd sets JOURNAL_STREAM to the stream's "device:inode"), each line
// starts with its syslog priority, "<N>" (sd-daemon(3)), so `journalctl -p
// warning` and the console colouring see spdlog's levels; the journal adds
// its own timestamps. Elsewhere lines keep svmd's own format.
#ifndef SVM_DAEMON_SYSTEMD_JOURNAL_H_
#define SVM_DAEMON_SYSTEMD_JOURNAL_H_

#include "spdlog/common.h"

namespace svm::systemd {

// Whether fd 2 is the stream JOURNAL_STREAM names.
bool StderrIsJournal();

// The syslog priority (sd-daemon's SD_ERR etc.) of an spdlog level.
int SyslogPriority(spdlog::level::level_enum level);

// Sets the default logger's pattern: "<N>message" when stderr is
// the journal, a timestamped line otherwise.
void SetLogPattern();

}  // namespace svm::systemd

#endif  // SVM_DAEMON_SYSTEMD_JOURNAL_H_
