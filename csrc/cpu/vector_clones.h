// Runtime-dispatched vector code for the CPU kernels: a function marked BMSSL_VECTOR_CLONES is
// compiled three times (x86-64-v4: AVX-512; x86-64-v3: AVX2 + FMA; baseline x86-64) and the
// loader picks the best one the CPU supports. Helpers it calls must be inlined into it
// (BMSSL_INLINE) to be compiled for the clone's ISA; an out-of-line helper stays baseline.
//
// The clones are named by ISA level, not by CPU model: GCC resolves "arch=<model>" clones with
// __builtin_cpu_is(<model>), so "arch=skylake-avx512" and "arch=haswell" never match an AMD CPU
// (an AVX-512 EPYC ran the baseline clone). "arch=x86-64-v4" / "v3" test the features themselves.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#if __GNUC__ >= 12
#define BMSSL_CLONE_WIDE "arch=x86-64-v4"
#define BMSSL_CLONE_NARROW "arch=x86-64-v3"
#else
#define BMSSL_CLONE_WIDE "avx512f"
#define BMSSL_CLONE_NARROW "avx2"
#endif
#define BMSSL_VECTOR_CLONES __attribute__((target_clones(BMSSL_CLONE_WIDE, BMSSL_CLONE_NARROW, "default")))
#define BMSSL_HAVE_VECTOR_CLONES 1
#else
#define BMSSL_VECTOR_CLONES
#define BMSSL_HAVE_VECTOR_CLONES 0
#endif
#define BMSSL_INLINE inline __attribute__((always_inline))
