/* Preloaded into a test's child process (LD_PRELOAD) when a C compiler is present: on SIGSEGV, SIGBUS or SIGABRT
 * it writes the native stack (glibc backtrace: exported symbols and library offsets) to stderr, then lets the
 * signal kill the process as before. Python's faulthandler prints only Python frames; this names the C/C++ frame
 * that crashed (tests/backends/test_native_contract.py, tests/test_errors.py). */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static char alternate_stack[1 << 16];

static void on_fault(int sig) {
  void* frames[96];
  static const char header[] = "\nnative backtrace (tests/helpers/segv_backtrace.c):\n";
  int n = backtrace(frames, 96);
  (void)!write(2, header, sizeof header - 1);
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  void* warm[1];
  backtrace(warm, 1); /* loads the unwinder now, not inside the handler */
  stack_t stack;
  memset(&stack, 0, sizeof stack);
  stack.ss_sp = alternate_stack;
  stack.ss_size = sizeof alternate_stack;
  sigaltstack(&stack, NULL);
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_handler = on_fault;
  action.sa_flags = SA_ONSTACK | SA_RESETHAND;
  sigaction(SIGSEGV, &action, NULL);
  sigaction(SIGBUS, &action, NULL);
  sigaction(SIGABRT, &action, NULL);
}
