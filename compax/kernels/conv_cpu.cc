// Direct 2-D convolution kernels for the CPU (stride 1, no padding, float32, NHWC images, HWIO
// kernels), called from JAX through the XLA FFI (compax/kernels/conv_cpu.py, which gets the input
// gradient from the forward kernel). XLA:CPU runs convolutions over few channels (LeNet-5's
// 3 -> 6 and 6 -> 16) several times slower than PyTorch's oneDNN; these loops keep the output
// channels of a pixel in one vector register (GCC/Clang vector extensions: AVX-512 or AVX2 with
// -march=native) and broadcast one input value at a time into it.
//
//   forward:         y[b,p,q,o]  = sum_{i,j,c} x[b,p+i,q+j,c] * w[i,j,c,o]
//   weight gradient: dw[i,j,c,o] = sum_{b,p,q} x[b,p+i,q+j,c] * g[b,p,q,o]
//
// with x zero-padded by pad_top, pad_bottom, pad_left and pad_right rows and columns. The forward
// kernel skips the zero rows rather than multiplying them; zero columns, and the weight gradient's
// zero rows, are written around each image in a buffer of the thread that computes it (an image
// of a few KB, in cache), which costs far less than a padded copy of the whole batch through
// memory (XLA's pad fusions took ~14% of a CPU-sized ResNet-18 train step).
//
// Leading axes before the four of an image batch or kernel are members of a population (JAX's
// vmap with vmap_method="broadcast_all": every operand has them, each member its own images and
// kernel): one call computes every member, x (M..., B, H, W, C) with w (M..., KH, KW, C, O).
// Fixed ranges of each member's images (members x ranges pieces of work) are split over XLA's CPU
// thread pool; the weight gradient adds a member's partial sums of its ranges in a fixed order,
// the ranges depending on the batch alone, so results do not depend on timing or on how many
// members share the call.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "image_ranges.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using compax::Chunks;
using compax::ForImageRanges;

struct Shape {
  int64_t batch, height, width, in_channels, kernel_h, kernel_w, out_channels;
  // Zero rows and columns around the images.
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  int64_t out_h() const { return height + pad_top + pad_bottom - kernel_h + 1; }
  int64_t out_w() const { return width + pad_left + pad_right - kernel_w + 1; }
  int64_t image_size() const { return height * width * in_channels; }
};

// Images padded one at a time into a buffer of their own: the shape of a padded image (its zero
// rows `rows` only if asked, the columns always), and Pad, which copies image b into the buffer.
class PaddedImages {
 public:
  PaddedImages(const Shape& s, bool rows)
      : source_(s), padded_(s), top_(rows ? s.pad_top : 0) {
    padded_.height += rows ? s.pad_top + s.pad_bottom : 0;
    padded_.width += s.pad_left + s.pad_right;
    padded_.pad_left = padded_.pad_right = 0;
    if (rows) padded_.pad_top = padded_.pad_bottom = 0;
    if (padded_.height != s.height || padded_.width != s.width)
      buffer_.assign(padded_.image_size(), 0.0f);  // the zeros around the images stay
  }
  const Shape& shape() const { return padded_; }
  // Image b of x, padded (x's own memory if nothing is to be padded).
  const float* Pad(const float* x, int64_t b) {
    const float* image = x + b * source_.image_size();
    if (buffer_.empty()) return image;
    const int64_t c = source_.in_channels, row = source_.width * c;
    for (int64_t h = 0; h < source_.height; ++h)
      std::memcpy(buffer_.data() + ((h + top_) * padded_.width + source_.pad_left) * c,
                  image + h * row, row * sizeof(float));
    return buffer_.data();
  }

 private:
  Shape source_, padded_;
  int64_t top_;
  std::vector<float> buffer_;
};

// L floats in one vector (8: AVX2 register, 16: AVX-512 register), loadable from any float address.
template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(L * sizeof(float))));
  typedef float unaligned __attribute__((vector_size(L * sizeof(float)), aligned(4)));
};

template <int L>
inline typename Vec<L>::type Load(const float* from) {
  return *reinterpret_cast<const typename Vec<L>::unaligned*>(from);
}

// The kernel with its output channels padded with zeros to a multiple of L: (KH, KW, C, O_pad).
std::vector<float> PadOutputChannels(const Shape& s, const float* w, int64_t padded) {
  const int64_t taps = s.kernel_h * s.kernel_w * s.in_channels;
  std::vector<float> out(taps * padded, 0.0f);
  for (int64_t t = 0; t < taps; ++t)
    std::memcpy(out.data() + t * padded, w + t * s.out_channels, s.out_channels * sizeof(float));
  return out;
}

// R consecutive output pixels (row p, columns q0..q0+R-1) of the L output channels o0..o0+L-1.
// In NHWC / HWIO the taps (j, c) of kernel row i are contiguous in both the image row and the
// kernel, so one loop runs over the kernel_w * in_channels of them.
template <int L, int R>
inline void ForwardPixels(const Shape& s, const float* image, const float* w_pad, int64_t padded,
                          float* y, int64_t p, int64_t q0, int64_t o0) {
  using V = typename Vec<L>::type;
  const int64_t c_count = s.in_channels, taps = s.kernel_w * c_count;
  V acc[R] = {};
  // Kernel rows i that meet image row p + i - pad_top inside the image.
  const int64_t i_end = std::min(s.kernel_h, s.height + s.pad_top - p);
  for (int64_t i = std::max<int64_t>(0, s.pad_top - p); i < i_end; ++i) {
    const float* in = image + ((p + i - s.pad_top) * s.width + q0) * c_count;
    const float* weights = w_pad + i * taps * padded + o0;
    for (int64_t t = 0; t < taps; ++t) {
      const V wv = Load<L>(weights + t * padded);
      for (int r = 0; r < R; ++r) acc[r] += in[r * c_count + t] * wv;
    }
  }
  const int64_t oh = s.out_h(), ow = s.out_w(), count = std::min<int64_t>(L, s.out_channels - o0);
  // With one channel block, a whole vector may be stored past a pixel's channels into the next
  // pixels', which are written after it; not past the image's end (another thread's).
  const bool spill = o0 == 0 && count == s.out_channels;
  for (int r = 0; r < R; ++r) {
    const int64_t offset = (p * ow + q0 + r) * s.out_channels + o0;
    float* out = y + offset;
    if (count == L || (spill && offset + L <= oh * ow * s.out_channels))
      *reinterpret_cast<typename Vec<L>::unaligned*>(out) = acc[r];
    else
      for (int64_t l = 0; l < count; ++l) out[l] = acc[r][l];
  }
}

template <int L, int R>
void ForwardRow(const Shape& s, const float* image, const float* w_pad, int64_t padded, float* y,
                int64_t p, int64_t o0) {
  const int64_t ow = s.out_w();
  if (ow < R) {
    for (int64_t q = 0; q < ow; ++q) ForwardPixels<L, 1>(s, image, w_pad, padded, y, p, q, o0);
    return;
  }
  // The last block ends at the row's end, overlapping the one before (same values).
  for (int64_t q = 0; q < ow; q += R)
    ForwardPixels<L, R>(s, image, w_pad, padded, y, p, std::min(q, ow - R), o0);
}

// The block of 5 to 8 pixels (accumulators) that covers a row of `ow` with the least overlap.
int64_t PixelBlock(int64_t ow) {
  int64_t best = 8;
  for (int64_t r = 8; r >= 5; --r)
    if ((ow + r - 1) / r * r < (ow + best - 1) / best * best) best = r;
  return best;
}

// Images b0..b1; w_pad is the kernel from PadOutputChannels with `padded` a multiple of L.
template <int L>
void Forward(const Shape& source, const float* x, const float* w_pad, int64_t padded, float* y,
             int64_t b0, int64_t b1) {
  PaddedImages images(source, /*rows=*/false);
  const Shape& s = images.shape();
  const int64_t oh = s.out_h(), ow = s.out_w(), block = PixelBlock(ow);
  for (int64_t b = b0; b < b1; ++b) {
    const float* image = images.Pad(x, b);
    float* y_image = y + b * oh * ow * s.out_channels;
    for (int64_t p = 0; p < oh; ++p)
      for (int64_t o0 = 0; o0 < s.out_channels; o0 += L) {
        switch (block) {
          case 5: ForwardRow<L, 5>(s, image, w_pad, padded, y_image, p, o0); break;
          case 6: ForwardRow<L, 6>(s, image, w_pad, padded, y_image, p, o0); break;
          case 7: ForwardRow<L, 7>(s, image, w_pad, padded, y_image, p, o0); break;
          default: ForwardRow<L, 8>(s, image, w_pad, padded, y_image, p, o0);
        }
      }
  }
}

// Adds to dw_pad (KH, KW * C, O_pad) the taps t0..t0+T-1 of kernel row i for the output channels
// o0..o0+L-1, over one image: T accumulators share each load of the output gradient.
template <int L, int T>
void WeightGradientTaps(const Shape& s, const float* image, const float* grad, float* dw_pad,
                        int64_t padded, int64_t i, int64_t t0, int64_t o0) {
  using V = typename Vec<L>::type;
  const int64_t oh = s.out_h(), ow = s.out_w(), c_count = s.in_channels, o_count = s.out_channels;
  const bool full = o0 + L <= o_count;
  V acc[T] = {};
  for (int64_t p = 0; p < oh; ++p) {
    const float* in_row = image + (p + i) * s.width * c_count + t0;
    const float* grad_row = grad + p * ow * o_count + o0;
    for (int64_t q = 0; q < ow; ++q) {
      V gv;
      // Lanes past the channels (the next pixels') go to the padding, not past the image's end.
      if (full || ((p * ow + q) * o_count + o0 + L <= oh * ow * o_count)) {
        gv = Load<L>(grad_row + q * o_count);
      } else {
        gv = V{};
        for (int64_t l = 0; l < o_count - o0; ++l) gv[l] = grad_row[q * o_count + l];
      }
      const float* in = in_row + q * c_count;
      for (int t = 0; t < T; ++t) acc[t] += in[t] * gv;
    }
  }
  float* out = dw_pad + (i * s.kernel_w * c_count + t0) * padded + o0;
  for (int t = 0; t < T; ++t)
    *reinterpret_cast<typename Vec<L>::unaligned*>(out + t * padded) += acc[t];
}

template <int L, int T = 1>
void WeightGradientTail(int64_t taps, const Shape& s, const float* image, const float* grad,
                        float* dw_pad, int64_t padded, int64_t i, int64_t t0, int64_t o0) {
  if constexpr (T < 16) {
    if (taps == T) return WeightGradientTaps<L, T>(s, image, grad, dw_pad, padded, i, t0, o0);
    WeightGradientTail<L, T + 1>(taps, s, image, grad, dw_pad, padded, i, t0, o0);
  }
}

template <int L>
void WeightGradient(const Shape& source, const float* x, const float* g, float* dw_pad,
                    int64_t padded, int64_t b0, int64_t b1) {
  constexpr int kTaps = 15;  // accumulators (of 16 or 32 vector registers)
  PaddedImages images(source, /*rows=*/true);
  const Shape& s = images.shape();
  const int64_t oh = s.out_h(), ow = s.out_w(), taps = s.kernel_w * s.in_channels;
  for (int64_t b = b0; b < b1; ++b) {
    const float* image = images.Pad(x, b);
    const float* grad = g + b * oh * ow * s.out_channels;
    for (int64_t o0 = 0; o0 < s.out_channels; o0 += L)
      for (int64_t i = 0; i < s.kernel_h; ++i) {
        int64_t t = 0;
        for (; t + kTaps <= taps; t += kTaps)
          WeightGradientTaps<L, kTaps>(s, image, grad, dw_pad, padded, i, t, o0);
        if (t < taps) WeightGradientTail<L>(taps - t, s, image, grad, dw_pad, padded, i, t, o0);
      }
  }
}

// The last four axes of the images and the kernel (the leading ones are members), and the padding.
Shape ShapeOf(ffi::Buffer<ffi::F32>& images, ffi::Buffer<ffi::F32>& kernel, int64_t pad_top,
              int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  auto x = images.dimensions().last(4);
  auto k = kernel.dimensions().last(4);
  return Shape{x[0], x[1], x[2], x[3], k[0], k[1], k[3], pad_top, pad_bottom, pad_left, pad_right};
}

// The number of members: the product of the axes before the last four (1 without them).
int64_t Members(ffi::Buffer<ffi::F32>& buffer) {
  auto dims = buffer.dimensions();
  int64_t members = 1;
  for (size_t a = 0; a + 4 < dims.size(); ++a) members *= dims[a];
  return members;
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                           int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  const Shape s = ShapeOf(x, w, pad_top, pad_bottom, pad_left, pad_right);
  const int64_t members = Members(x);
  if (Members(w) != members) return ffi::Error::InvalidArgument("images and kernels: other members");
  const int64_t lanes = s.out_channels <= 8 ? 8 : 16;
  const int64_t padded = (s.out_channels + lanes - 1) / lanes * lanes;
  const int64_t taps = s.kernel_h * s.kernel_w * s.in_channels;
  const int64_t x_size = s.batch * s.image_size();
  const int64_t y_size = s.batch * s.out_h() * s.out_w() * s.out_channels;
  std::vector<float> kernels;  // every member's kernel from PadOutputChannels, one after another
  kernels.reserve(members * taps * padded);
  for (int64_t m = 0; m < members; ++m) {
    const std::vector<float> kernel = PadOutputChannels(s, w.typed_data() + m * taps * s.out_channels,
                                                        padded);
    kernels.insert(kernels.end(), kernel.begin(), kernel.end());
  }
  const float *images = x.typed_data(), *w_pad = kernels.data();
  float* out = y->typed_data();
  ForImageRanges(pool, members, s.batch, Chunks(pool, s.batch),
                 [=](int64_t m, int64_t, int64_t b0, int64_t b1) {
    const float *member_images = images + m * x_size, *member_w = w_pad + m * taps * padded;
    if (lanes == 8)
      Forward<8>(s, member_images, member_w, padded, out + m * y_size, b0, b1);
    else
      Forward<16>(s, member_images, member_w, padded, out + m * y_size, b0, b1);
  });
  return ffi::Error::Success();
}

// x: the layer's input (unpadded), w: only its shape is used, g: the output gradient.
ffi::Error ConvWeightGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> g,
                                  ffi::ResultBuffer<ffi::F32> dw, int64_t pad_top,
                                  int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  const Shape s = ShapeOf(x, w, pad_top, pad_bottom, pad_left, pad_right);
  const int64_t members = Members(x);
  if (Members(w) != members || Members(g) != members)
    return ffi::Error::InvalidArgument("images, kernels and gradients: other members");
  const int64_t lanes = s.out_channels <= 8 ? 8 : 16;
  const int64_t padded = (s.out_channels + lanes - 1) / lanes * lanes;
  const int64_t taps = s.kernel_h * s.kernel_w * s.in_channels;
  const int64_t chunks = Chunks(pool, s.batch);
  const int64_t x_size = s.batch * s.image_size();
  const int64_t g_size = s.batch * s.out_h() * s.out_w() * s.out_channels;
  // partial[(m * chunks + k) * taps * padded ...]: member m's sum over its k-th range of images.
  std::vector<float> partial(members * chunks * taps * padded, 0.0f);
  float* sums = partial.data();
  const float *images = x.typed_data(), *grad = g.typed_data();
  ForImageRanges(pool, members, s.batch, chunks, [=](int64_t m, int64_t k, int64_t b0, int64_t b1) {
    float* sum = sums + (m * chunks + k) * taps * padded;
    if (lanes == 8)
      WeightGradient<8>(s, images + m * x_size, grad + m * g_size, sum, padded, b0, b1);
    else
      WeightGradient<16>(s, images + m * x_size, grad + m * g_size, sum, padded, b0, b1);
  });
  float* out = dw->typed_data();
  for (int64_t m = 0; m < members; ++m)
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t o = 0; o < s.out_channels; ++o) {
        float sum = 0.0f;
        for (int64_t k = 0; k < chunks; ++k) sum += partial[((m * chunks + k) * taps + t) * padded + o];
        out[(m * taps + t) * s.out_channels + o] = sum;
      }
  return ffi::Error::Success();
}

// The four pads every handler takes after its buffers, as attributes of the custom call.
template <typename Binding>
auto WithPads(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CompaxConvForward, ConvForwardImpl,
                              WithPads(ffi::Ffi::Bind()
                                           .Ctx<ffi::ThreadPool>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CompaxConvWeightGradient, ConvWeightGradientImpl,
                              WithPads(ffi::Ffi::Bind()
                                           .Ctx<ffi::ThreadPool>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Arg<ffi::Buffer<ffi::F32>>()
                                           .Ret<ffi::Buffer<ffi::F32>>()));
