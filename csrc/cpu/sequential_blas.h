#pragma once
// MKL's per-thread thread count, when torch's BLAS is MKL (it is exported by libtorch_cpu on x86_64 builds). A GEMM
// issued from inside at::parallel_for must run on its calling thread: MKL's own nested OpenMP teams oversubscribe the
// cores and spin (measured ~1.4x slower for bfloat16 on 2 cores without this). Weak, so other BLAS builds still load.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace segvit::cpu {

// Makes BLAS calls on this thread single-threaded for the guard's lifetime (a no-op without MKL).
class SequentialBlasGuard {
 public:
  SequentialBlasGuard() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlasGuard() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlasGuard(const SequentialBlasGuard&) = delete;
  SequentialBlasGuard& operator=(const SequentialBlasGuard&) = delete;

 private:
  int previous_;
};

}  // namespace segvit::cpu
