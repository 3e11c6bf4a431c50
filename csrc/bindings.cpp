// segvit._C: registration of the custom ops and a small Python module describing the build.
// The only file that includes torch/extension.h / torch/library.h (slow to compile); kernels see ATen headers only.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/mask_classify.h"
#include "cpu/mask_losses.h"
#ifdef SEGVIT_WITH_CUDA
#include "cuda/kernels.h"
#endif
#include "cpu/attention.h"

// Op schemas. Fake (meta) kernels are registered from Python (segvit/_extension.py) with torch.library.register_fake.
TORCH_LIBRARY(segvit, m) {
  m.def("mask_classify(Tensor class_logits, Tensor mask_logits, SymInt[2] out_size) -> Tensor");
  // mask_losses: per-(image, class) stats (B, K, 4) float64 = [sum focal, sum sigmoid*t, sum sigmoid, sum t] of the
  // present classes (csrc/cpu/mask_losses.h); segvit/ops/mask_losses.py turns them into the losses.
  m.def("mask_loss_stats(Tensor mask_logits, Tensor labels, int ignore_index, float alpha, float gamma) -> Tensor");
  m.def("mask_loss_stats_backward(Tensor grad_stats, Tensor mask_logits, Tensor labels, Tensor stats, "
        "int ignore_index, float alpha, float gamma) -> Tensor");
  // atm_attention: (out, sim, lse); lse (B, H, Nq) float32 is saved for the backward.
  // dropout_p > 0: attention dropout with a keep mask hashed from (seed, b, h, query, key); bwd regenerates it.
  m.def("atm_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, float dropout_p=0., int seed=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("atm_attention_bwd(Tensor grad_out, Tensor grad_sim, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, float dropout_p=0., int seed=0) -> (Tensor, Tensor, Tensor)");
  // query_pool_attention: (out, q, kv, lse); q (scaled), kv and lse are saved for the backward.
  m.def("query_pool_attention_fwd(Tensor x, SymInt[2] grid, Tensor in_proj_weight, Tensor in_proj_bias, "
        "int num_heads, int stride) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("query_pool_attention_bwd(Tensor grad_out, Tensor x, SymInt[2] grid, Tensor in_proj_weight, Tensor q, "
        "Tensor kv, Tensor out, Tensor lse, int num_heads, int stride) -> (Tensor, Tensor, Tensor)");
}

namespace {

// Each kernel runs with autocast excluded: the ATen calls inside (the projections of query_pool_attention, the BLAS
// fallbacks) then compute in the dtypes the op was called with, which are the dtypes its fake kernel states. Without
// this, a direct call inside torch.autocast re-cast them (bfloat16 inputs, float16 kv). segvit.ops applies the autocast
// policy at the op boundary before calling (segvit/ops/_autocast.py).
template <auto Kernel>
struct WithoutAutocast;

template <typename Result, typename... Args, Result (*Kernel)(Args...)>
struct WithoutAutocast<Kernel> {
  static Result call(Args... args) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return Kernel(std::forward<Args>(args)...);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(segvit, CPU, m) {
  m.impl("mask_classify", &WithoutAutocast<&segvit::cpu::mask_classify>::call);
  m.impl("mask_loss_stats", &WithoutAutocast<&segvit::cpu::mask_loss_stats>::call);
  m.impl("mask_loss_stats_backward", &WithoutAutocast<&segvit::cpu::mask_loss_stats_backward>::call);
  m.impl("atm_attention_fwd", &WithoutAutocast<&segvit::cpu::atm_attention_forward>::call);
  m.impl("atm_attention_bwd", &WithoutAutocast<&segvit::cpu::atm_attention_backward>::call);
  m.impl("query_pool_attention_fwd", &WithoutAutocast<&segvit::cpu::query_pool_attention_forward>::call);
  m.impl("query_pool_attention_bwd", &WithoutAutocast<&segvit::cpu::query_pool_attention_backward>::call);
}

#ifdef SEGVIT_WITH_CUDA
TORCH_LIBRARY_IMPL(segvit, CUDA, m) {
  m.impl("mask_classify", &WithoutAutocast<&segvit::cuda::mask_classify>::call);
  m.impl("mask_loss_stats", &WithoutAutocast<&segvit::cuda::mask_loss_stats>::call);
  m.impl("mask_loss_stats_backward", &WithoutAutocast<&segvit::cuda::mask_loss_stats_backward>::call);
}
#endif

#define SEGVIT_STRINGIFY_(x) #x
#define SEGVIT_STRINGIFY(x) SEGVIT_STRINGIFY_(x)

namespace {

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + SEGVIT_STRINGIFY(_MSC_VER);
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cpu_isa"] = segvit::cpu::isa_info();
#ifdef SEGVIT_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = SEGVIT_STRINGIFY(TORCH_VERSION_MAJOR) "." SEGVIT_STRINGIFY(TORCH_VERSION_MINOR) "." SEGVIT_STRINGIFY(
      TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segvit compiled kernels; the ops are registered as torch.ops.segvit.*";
  m.def("build_info", &build_info, "Compiler, CPU ISA path, whether CUDA kernels were built.");
}
