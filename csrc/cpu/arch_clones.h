// The one place that decides whether the CPU kernels' element-wise loops get runtime-selected ISA clones.
// GCC on x86_64 Linux: each marked function is compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the
// baseline, and an ifunc picks one at load time (the extension must run on any x86_64, so no -march=native).
// Elsewhere (clang, other platforms, or -DSEGVIT_NO_TARGET_CLONES) the loops are compiled for the baseline only.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(SEGVIT_NO_TARGET_CLONES)
#define SEGVIT_HAVE_ARCH_CLONES 1
#define SEGVIT_ARCH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SEGVIT_HAVE_ARCH_CLONES 0
#define SEGVIT_ARCH_CLONES
#endif
