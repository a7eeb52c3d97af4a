// 2-D convolutions (float32, NHWC images, HWIO kernels, strides, explicit zero padding) on oneDNN,
// the library behind PyTorch's CPU convolutions, called from JAX through the XLA FFI
// (compax/kernels/conv_onednn.py). Three handlers, one per oneDNN primitive:
//
//   forward:         y[b,p,q,o]   = sum_{i,j,c} x[b, s_h p + i - pad_top, s_w q + j - pad_left, c]
//                                                * w[i,j,c,o]          (x zero outside the image)
//   input gradient:  dx[b,h,v,c]  = sum_{p,q,o : h = s_h p + i - pad_top, v = s_w q + j - pad_left}
//                                                g[b,p,q,o] * w[i,j,c,o]
//   weight gradient: dw[i,j,c,o]  = sum_{b,p,q} x[b, s_h p + i - pad_top, s_w q + j - pad_left, c]
//                                                * g[b,p,q,o]
//
// The shapes come from the buffers (the result's too: the input gradient's image size, the weight
// gradient's kernel size), the strides and paddings from attributes. The images of a call are
// split into fixed ranges, members x ranges pieces of work run on XLA's CPU thread pool
// (compax::ForImageRanges, as conv_cpu.cc), each piece a single-threaded oneDNN primitive on its
// images: oneDNN's own OpenMP threads meet at barriers, which cost a scheduler tick (~4 ms) each
// whenever another process holds a core, while a thread of the pool that is not running leaves
// its pieces to the others. The weight gradient adds the pieces' partial sums in a fixed order;
// the ranges depend on the batch and the pool alone, so a member's result is the bits of its own
// call. A primitive (with its reorders) is made once per piece shape and direction (creating one
// takes milliseconds) and kept in a cache shared by the threads; it runs on a scratchpad of the
// call's own. Its images and gradients stay NHWC; its kernel takes the layout oneDNN picks
// (format_tag::any: blocked), reordered from or to HWIO on every call (conv_onednn.py has the
// measurements behind these choices).

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "image_ranges.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum Direction : int64_t { kForward, kInputGradient, kWeightGradient };

// One member's convolution: (images, kernel, output) shapes, strides and paddings.
struct Geometry {
  int64_t batch, height, width, in_channels, kernel_h, kernel_w, out_channels, out_h, out_w;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;

  memory::desc Images(Tag tag) const {
    return {{batch, in_channels, height, width}, memory::data_type::f32, tag};
  }
  memory::desc Kernel(Tag tag) const {
    return {{out_channels, in_channels, kernel_h, kernel_w}, memory::data_type::f32, tag};
  }
  memory::desc Output(Tag tag) const {
    return {{batch, out_channels, out_h, out_w}, memory::data_type::f32, tag};
  }
  std::array<int64_t, 16> Key(Direction direction) const {
    return {direction, batch, height, width, in_channels, kernel_h, kernel_w, out_channels,
            out_h, out_w, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Primitives are made with a scratchpad given at execution (scratchpad_mode::user): oneDNN's own
// one belongs to the primitive, which threads running it at once would share.
const dnnl::primitive_attr& UserScratchpad() {
  static const dnnl::primitive_attr attr = [] {
    dnnl::primitive_attr a;
    a.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return a;
  }();
  return attr;
}

// A primitive with the size of the scratchpad each execution gets.
struct Step {
  dnnl::primitive primitive;
  memory::desc scratchpad;

  Step() = default;
  Step(dnnl::primitive primitive, const dnnl::primitive_desc_base& pd)
      : primitive(std::move(primitive)), scratchpad(pd.scratchpad_desc()) {}

  void Execute(dnnl::stream& stream, std::unordered_map<int, memory> args) const {
    if (scratchpad.get_size() > 0) args[DNNL_ARG_SCRATCHPAD] = memory(scratchpad, Engine());
    primitive.execute(stream, args);
  }
};

// A convolution with its two operands and its result: the oneDNN argument of each, the caller's
// layout (NHWC, HWIO) and the primitive's, and reorders between them where they differ.
struct Plan {
  Step convolution;
  std::array<int, 3> args;  // operand, operand, result
  std::array<memory::desc, 3> user, chosen;
  std::array<Step, 3> reorders;  // user -> chosen for operands, chosen -> user for the result

  Plan(dnnl::primitive primitive, const dnnl::primitive_desc_base& pd, std::array<int, 3> args,
       std::array<memory::desc, 3> user)
      : convolution(std::move(primitive), pd), args(args), user(user) {
    for (int k = 0; k < 3; ++k) {
      chosen[k] = pd.query_md(dnnl::query::exec_arg_md, args[k]);
      if (chosen[k] == user[k]) continue;
      const memory::desc &from = k < 2 ? user[k] : chosen[k], &to = k < 2 ? chosen[k] : user[k];
      const dnnl::reorder::primitive_desc reorder(Engine(), from, Engine(), to, UserScratchpad());
      reorders[k] = Step(dnnl::reorder(reorder), reorder);
    }
  }

  // result = the convolution of (first, second), all in the caller's layouts.
  void Run(dnnl::stream& stream, const float* first, const float* second, float* result) const {
    const std::array<void*, 3> data = {const_cast<float*>(first), const_cast<float*>(second),
                                       result};
    std::array<memory, 3> given, used;
    for (int k = 0; k < 3; ++k) {
      given[k] = memory(user[k], Engine(), data[k]);
      used[k] = chosen[k] == user[k] ? given[k] : memory(chosen[k], Engine());
      if (k < 2 && chosen[k] != user[k])
        reorders[k].Execute(stream, {{DNNL_ARG_FROM, given[k]}, {DNNL_ARG_TO, used[k]}});
    }
    convolution.Execute(stream, {{args[0], used[0]}, {args[1], used[1]}, {args[2], used[2]}});
    if (chosen[2] != user[2])
      reorders[2].Execute(stream, {{DNNL_ARG_FROM, used[2]}, {DNNL_ARG_TO, given[2]}});
    stream.wait();
  }
};

std::unique_ptr<Plan> MakePlan(const Geometry& g, Direction direction) {
  const memory::dims strides = {g.stride_h, g.stride_w}, pad_l = {g.pad_top, g.pad_left},
                     pad_r = {g.pad_bottom, g.pad_right};
  const memory::desc images = g.Images(Tag::nhwc), output = g.Output(Tag::nhwc),
                     kernel_any = g.Kernel(Tag::any), kernel = g.Kernel(Tag::hwio);
  const auto algorithm = dnnl::algorithm::convolution_direct;
  const dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, algorithm, images, kernel_any, output,
      strides, pad_l, pad_r, UserScratchpad());
  switch (direction) {
    case kForward:
      return std::make_unique<Plan>(dnnl::convolution_forward(forward), forward,
                                    std::array{DNNL_ARG_SRC, DNNL_ARG_WEIGHTS, DNNL_ARG_DST},
                                    std::array{images, kernel, output});
    case kInputGradient: {
      const dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), algorithm, images, kernel_any, output, strides, pad_l, pad_r, forward,
          UserScratchpad());
      return std::make_unique<Plan>(dnnl::convolution_backward_data(pd), pd,
                                    std::array{DNNL_ARG_DIFF_DST, DNNL_ARG_WEIGHTS, DNNL_ARG_DIFF_SRC},
                                    std::array{output, kernel, images});
    }
    default: {
      const dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), algorithm, images, kernel_any, output, strides, pad_l, pad_r, forward,
          UserScratchpad());
      return std::make_unique<Plan>(
          dnnl::convolution_backward_weights(pd), pd,
          std::array{DNNL_ARG_SRC, DNNL_ARG_DIFF_DST, DNNL_ARG_DIFF_WEIGHTS},
          std::array{images, output, kernel});
    }
  }
}

// The plan of a shape and direction, made on first use; plans are never removed (a model has a
// few dozen shapes), so the references stay valid.
const Plan& CachedPlan(const Geometry& g, Direction direction) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 16>, std::unique_ptr<Plan>> plans;
  const auto key = g.Key(direction);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto found = plans.find(key);
    if (found != plans.end()) return *found->second;
  }
  std::unique_ptr<Plan> plan = MakePlan(g, direction);  // outside the lock: slow
  std::lock_guard<std::mutex> lock(mutex);
  return *plans.try_emplace(key, std::move(plan)).first->second;  // another thread's if it won
}

// While it exists, the thread's OpenMP parallel regions have one thread: its primitives are made
// for one thread and run on it alone. The thread's own setting (of the system's libgomp, which
// oneDNN uses) is restored afterwards.
class SingleThreaded {
 public:
  SingleThreaded() : previous_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(previous_); }

 private:
  const int previous_;
};

// The number of members: the product of the axes before the last four (1 without them).
template <typename Dims>
int64_t Members(const Dims& dims) {
  int64_t members = 1;
  for (size_t a = 0; a + 4 < dims.size(); ++a) members *= dims[a];
  return members;
}

// The direction's operands and result: (images, kernel) -> output, (output, kernel) -> images or
// (images, output) -> kernel, with images (M..., B, H, W, C), kernel (M..., KH, KW, C, O) and
// output (M..., B, OH, OW, O). Each piece of work (a member's range of images, compax::
// ForImageRanges) runs a single-threaded primitive for its images; a kernel result is the sum of
// the pieces' partial sums, added in a fixed order.
ffi::Error RunPieces(ffi::ThreadPool& pool, Direction direction, ffi::Buffer<ffi::F32>& first,
                     ffi::Buffer<ffi::F32>& second, ffi::ResultBuffer<ffi::F32>& result,
                     const std::array<int64_t, 6>& strides_pads) {
  enum Role { kImages, kKernel, kOutput };
  const std::array<Role, 3> roles = direction == kForward ? std::array{kImages, kKernel, kOutput}
                                    : direction == kInputGradient
                                        ? std::array{kOutput, kKernel, kImages}
                                        : std::array{kImages, kOutput, kKernel};
  const std::array<ffi::Span<const int64_t>, 3> dims = {
      first.dimensions(), second.dimensions(), result->dimensions()};
  const int64_t members = Members(dims[2]);
  if (Members(dims[0]) != members || Members(dims[1]) != members)
    return ffi::Error::InvalidArgument("oneDNN convolution: operands with other members");
  std::array<ffi::Span<const int64_t>, 3> of_role;
  for (int k = 0; k < 3; ++k) of_role[roles[k]] = dims[k].last(4);
  const auto x = of_role[kImages], w = of_role[kKernel], y = of_role[kOutput];
  const auto [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right] = strides_pads;
  const Geometry g{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                   stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
  // Floats per member and per image of each buffer (a kernel has no images).
  const std::array<int64_t, 3> role_member = {x[0] * x[1] * x[2] * x[3], w[0] * w[1] * w[2] * w[3],
                                              y[0] * y[1] * y[2] * y[3]};
  const std::array<int64_t, 3> role_image = {x[1] * x[2] * x[3], 0, y[1] * y[2] * y[3]};
  const int64_t chunks = compax::Chunks(pool, g.batch), kernel_size = role_member[kKernel];
  std::vector<float> partial(direction == kWeightGradient ? members * chunks * kernel_size : 0);
  const std::array<float*, 3> data = {first.typed_data(), second.typed_data(),
                                      result->typed_data()};
  std::mutex error_mutex;
  std::string error;
  compax::ForImageRanges(pool, members, g.batch, chunks,
                         [&](int64_t m, int64_t k, int64_t b0, int64_t b1) {
    std::array<float*, 3> at;
    for (int a = 0; a < 3; ++a)
      at[a] = data[a] + m * role_member[roles[a]] + b0 * role_image[roles[a]];
    if (direction == kWeightGradient) at[2] = partial.data() + (m * chunks + k) * kernel_size;
    Geometry piece = g;
    piece.batch = b1 - b0;
    try {
      const SingleThreaded single_threaded;
      dnnl::stream stream(Engine());
      CachedPlan(piece, direction).Run(stream, at[0], at[1], at[2]);
    } catch (const dnnl::error& e) {
      std::lock_guard<std::mutex> lock(error_mutex);
      error = e.what();
    }
  });
  if (!error.empty()) return ffi::Error::Internal("oneDNN convolution: " + error);
  if (direction == kWeightGradient)
    for (int64_t m = 0; m < members; ++m)
      for (int64_t t = 0; t < kernel_size; ++t) {
        float sum = 0.0f;
        for (int64_t k = 0; k < chunks; ++k) sum += partial[(m * chunks + k) * kernel_size + t];
        data[2][m * kernel_size + t] = sum;
      }
  return ffi::Error::Success();
}

template <Direction direction>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> first,
                   ffi::Buffer<ffi::F32> second, ffi::ResultBuffer<ffi::F32> result,
                   int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                   int64_t pad_left, int64_t pad_right) {
  return RunPieces(pool, direction, first, second, result,
                   {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right});
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

// (x, w) -> y; (g, w) -> dx; (x, g) -> dw.
XLA_FFI_DEFINE_HANDLER_SYMBOL(CompaxOneDnnForward, Handler<kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CompaxOneDnnInputGradient, Handler<kInputGradient>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(CompaxOneDnnWeightGradient, Handler<kWeightGradient>, Binding());
