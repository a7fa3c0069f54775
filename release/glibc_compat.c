/* Linked into rlfuse._C by release/zig_link.py (RLFUSE_GLIBC builds) to keep the module loadable on
 * glibc 2.28. gcc 12's libstdc++.a (and code compiled against glibc >= 2.32 headers) references
 * a few glibc symbols that do not exist in 2.28; zig's 2.28 stubs leave them undefined and
 * unversioned, which auditwheel does not see but an old dynamic loader rejects. These hidden
 * definitions resolve them inside the module. release/check_so.py fails the build if another
 * such symbol appears. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/random.h> /* getrandom: glibc 2.25 */
#include <sys/types.h>

/* glibc 2.32: libstdc++ skips atomic reference counting when this is non-zero. 0 means "maybe
 * multi-threaded", so atomics are always used: correct, and what libstdc++ does without it. */
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

/* glibc 2.36: std::random_device's default source (libstdc++.a random.o). */
__attribute__((visibility("hidden"))) uint32_t arc4random(void) {
  uint32_t value = 0;
  unsigned char *out = (unsigned char *)&value;
  size_t got = 0;
  while (got < sizeof value) {
    ssize_t n = getrandom(out + got, sizeof value - got, 0);
    if (n > 0) {
      got += (size_t)n;
    } else if (n < 0 && errno != EINTR) {
      __builtin_trap(); /* no entropy source at all: random_device cannot work */
    }
  }
  return value;
}
