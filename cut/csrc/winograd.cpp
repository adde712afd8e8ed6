// The transforms of the Winograd F(2x2, 3x3) convolution in cut/winograd.py, as the operators
// torch.ops.cut_native.*. The map transforms are memory-bound: each is one pass, plane by plane
// (one channel of one image) in torch's thread pool, over a band of tile rows [ty0, ty0 + rows),
// so that the caller can run a large map band by band with cache-sized buffers. Layouts: maps are
// (N, C, H, W); transformed tiles of a band are (16, C, N*rows*tw), the 16 tile positions
// outermost, so the products are 16 matrix multiplies. Input tile d (4x4) -> B^T d B; product
// tile m (4x4) -> A^T m A (2x2); each adjoint is the exact transpose, used by backward.
// Padding (one pixel, as the generator's convolutions use): 0 none, 1 reflect, 2 zeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

namespace {

enum Pad : int64_t { kNone = 0, kReflect = 1, kZeros = 2 };

void check_tensor(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim,
              "cut_native winograd: ", name, " must be a contiguous CPU tensor with ", dim,
              " dimensions, got ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "cut_native winograd: ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_same(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "cut_native winograd: mixed dtypes ", a.scalar_type(),
              " and ", b.scalar_type());
}

// The tile grid of a map (h, w) padded by one pixel unless pad is kNone: th x tw tiles.
struct Grid {
  int64_t hp, wp, th, tw;
  Grid(int64_t h, int64_t w, int64_t pad) : hp(pad ? h + 2 : h), wp(pad ? w + 2 : w) {
    TORCH_CHECK(pad >= kNone && pad <= kZeros, "cut_native winograd: unknown padding ", pad);
    TORCH_CHECK(hp >= 4 && wp >= 4 && hp % 2 == 0 && wp % 2 == 0 && (pad == kNone || (h >= 2 && w >= 2)),
                "cut_native winograd: a map of ", h, "x", w, (pad ? " padded by one" : ""),
                " does not give an even output of at least 2x2");
    th = (hp - 2) / 2;
    tw = (wp - 2) / 2;
  }
};

// The band's tile rows: `cols` / (n_img * tw), checked against the grid.
int64_t band_rows(int64_t cols, int64_t n_img, const Grid& g, int64_t ty0) {
  TORCH_CHECK(n_img > 0 && cols % (n_img * g.tw) == 0, "cut_native winograd: ", cols,
              " tiles are not a band of ", n_img, " maps with ", g.tw, " tiles per row");
  const int64_t rows = cols / (n_img * g.tw);
  TORCH_CHECK(rows > 0 && ty0 >= 0 && ty0 + rows <= g.th, "cut_native winograd: tile rows [", ty0, ", ",
              ty0 + rows, ") outside 0..", g.th);
  return rows;
}

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Rows [r0, r0 + count) of the padded plane into dst (count x (w + 2)).
template <typename T>
void pad_rows(const T* src, int64_t h, int64_t w, int64_t pad, int64_t r0, int64_t count, T* dst) {
  const int64_t wp = w + 2;
  for (int64_t r = r0; r < r0 + count; ++r) {
    T* d = dst + (r - r0) * wp;
    const int64_t sr = r - 1;
    if (pad == kZeros && (sr < 0 || sr >= h)) {
      std::fill(d, d + wp, T(0));
      continue;
    }
    const T* s = src + reflect(sr, h) * w;
    std::memcpy(d + 1, s, w * sizeof(T));
    d[0] = pad == kZeros ? T(0) : s[1];
    d[w + 1] = pad == kZeros ? T(0) : s[w - 2];
  }
}

// Band [ty0, ty0 + rows) of x (N, C, h, w), padded as `pad` says -> v (16, C, N*rows*tw).
void input_transform(const at::Tensor& x, int64_t pad, int64_t ty0, const at::Tensor& v) {
  check_tensor(x, 4, "x");
  check_tensor(v, 3, "v");
  check_same(x, v);
  const int64_t n_img = x.size(0), c_n = x.size(1), h = x.size(2), w = x.size(3);
  const Grid g(h, w, pad);
  TORCH_CHECK(v.size(0) == 16 && v.size(1) == c_n, "cut_native winograd: v of shape ", v.sizes(),
              " for ", c_n, " channels");
  const int64_t rows = band_rows(v.size(2), n_img, g, ty0), cols = v.size(2), wp = g.wp, tw = g.tw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cut_native_input_transform", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = v.data_ptr<scalar_t>();
    const int64_t stride = c_n * cols;  // between tile positions in v
    at::parallel_for(0, n_img * c_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> padded(pad ? (2 * rows + 2) * wp : 0), tmp(4 * wp);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / c_n, c = p % c_n;
        const scalar_t* plane = src + p * h * w + (pad ? 0 : 2 * ty0 * wp);
        if (pad) {
          pad_rows(src + p * h * w, h, w, pad, 2 * ty0, 2 * rows + 2, padded.data());
          plane = padded.data();
        }
        scalar_t* out = dst + c * cols + img * rows * tw;
        for (int64_t ty = 0; ty < rows; ++ty) {
          const scalar_t* __restrict__ d0 = plane + 2 * ty * wp;
          const scalar_t* __restrict__ d1 = d0 + wp;
          const scalar_t* __restrict__ d2 = d1 + wp;
          const scalar_t* __restrict__ d3 = d2 + wp;
          scalar_t* __restrict__ r0 = tmp.data();
          scalar_t* __restrict__ r1 = r0 + wp;
          scalar_t* __restrict__ r2 = r1 + wp;
          scalar_t* __restrict__ r3 = r2 + wp;
          for (int64_t i = 0; i < wp; ++i) {
            r0[i] = d0[i] - d2[i];
            r1[i] = d1[i] + d2[i];
            r2[i] = d2[i] - d1[i];
            r3[i] = d1[i] - d3[i];
          }
          for (int64_t a = 0; a < 4; ++a) {
            const scalar_t* __restrict__ r = tmp.data() + a * wp;
            scalar_t* __restrict__ o0 = out + 4 * a * stride + ty * tw;
            scalar_t* __restrict__ o1 = o0 + stride;
            scalar_t* __restrict__ o2 = o1 + stride;
            scalar_t* __restrict__ o3 = o2 + stride;
            for (int64_t t = 0; t < tw; ++t) {
              const scalar_t e0 = r[2 * t], e1 = r[2 * t + 1], e2 = r[2 * t + 2], e3 = r[2 * t + 3];
              o0[t] = e0 - e2;
              o1[t] = e1 + e2;
              o2[t] = e2 - e1;
              o3[t] = e1 - e3;
            }
          }
        }
      }
    });
  });
}

// The transpose of input_transform for band [ty0, ty0 + rows): adds gv (16, C, N*rows*tw) into
// gx, the gradient of the padded map (N, C, hp, wp).
void input_transform_adjoint(const at::Tensor& gv, int64_t ty0, const at::Tensor& gx) {
  check_tensor(gv, 3, "gv");
  check_tensor(gx, 4, "gx");
  check_same(gv, gx);
  const int64_t n_img = gx.size(0), c_n = gx.size(1);
  const Grid g(gx.size(2), gx.size(3), kNone);
  TORCH_CHECK(gv.size(0) == 16 && gv.size(1) == c_n, "cut_native winograd: gv of shape ", gv.sizes(),
              " for ", c_n, " channels");
  const int64_t rows = band_rows(gv.size(2), n_img, g, ty0), cols = gv.size(2), wp = g.wp, tw = g.tw;
  AT_DISPATCH_FLOATING_TYPES(gv.scalar_type(), "cut_native_input_transform_adjoint", [&] {
    const scalar_t* src = gv.const_data_ptr<scalar_t>();
    scalar_t* dst = gx.data_ptr<scalar_t>();
    const int64_t stride = c_n * cols;
    at::parallel_for(0, n_img * c_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(4 * wp);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / c_n, c = p % c_n;
        const scalar_t* in = src + c * cols + img * rows * tw;
        scalar_t* plane = dst + p * g.hp * wp + 2 * ty0 * wp;
        for (int64_t ty = 0; ty < rows; ++ty) {
          std::fill(tmp.begin(), tmp.end(), scalar_t(0));
          for (int64_t a = 0; a < 4; ++a) {
            scalar_t* r = tmp.data() + a * wp;
            const scalar_t* g0 = in + 4 * a * stride + ty * tw;
            const scalar_t* g1 = g0 + stride;
            const scalar_t* g2 = g1 + stride;
            const scalar_t* g3 = g2 + stride;
            for (int64_t t = 0; t < tw; ++t) {
              r[2 * t] += g0[t];
              r[2 * t + 1] += g1[t] - g2[t] + g3[t];
              r[2 * t + 2] += g1[t] + g2[t] - g0[t];
              r[2 * t + 3] -= g3[t];
            }
          }
          scalar_t* __restrict__ d0 = plane + 2 * ty * wp;
          scalar_t* __restrict__ d1 = d0 + wp;
          scalar_t* __restrict__ d2 = d1 + wp;
          scalar_t* __restrict__ d3 = d2 + wp;
          const scalar_t* __restrict__ r0 = tmp.data();
          const scalar_t* __restrict__ r1 = r0 + wp;
          const scalar_t* __restrict__ r2 = r1 + wp;
          const scalar_t* __restrict__ r3 = r2 + wp;
          for (int64_t i = 0; i < wp; ++i) {
            d0[i] += r0[i];
            d1[i] += r1[i] - r2[i] + r3[i];
            d2[i] += r1[i] + r2[i] - r0[i];
            d3[i] -= r3[i];
          }
        }
      }
    });
  });
}

// Band [ty0, ty0 + rows) of the products m (16, K, N*rows*tw), plus bias (K) when given -> output
// rows [2 ty0, 2 (ty0 + rows)) of out (N, K, 2th, 2tw).
void output_transform(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t ty0, const at::Tensor& out) {
  check_tensor(m, 3, "m");
  check_tensor(out, 4, "out");
  check_same(m, out);
  const int64_t n_img = out.size(0), k_n = out.size(1), oh = out.size(2), ow = out.size(3);
  const Grid g(oh + 2, ow + 2, kNone);
  TORCH_CHECK(m.size(0) == 16 && m.size(1) == k_n, "cut_native winograd: m of shape ", m.sizes(), " for ",
              k_n, " channels");
  if (bias) {
    check_tensor(*bias, 1, "bias");
    check_same(*bias, m);
    TORCH_CHECK(bias->size(0) == k_n, "cut_native winograd: bias must have ", k_n, " elements");
  }
  const int64_t rows = band_rows(m.size(2), n_img, g, ty0), cols = m.size(2), tw = g.tw;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cut_native_output_transform", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = k_n * cols;
    at::parallel_for(0, n_img * k_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(8 * tw);  // per tile row: A^T along x of each of the 4 rows
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / k_n, k = p % k_n;
        const scalar_t offset = b ? b[k] : scalar_t(0);
        const scalar_t* in = src + k * cols + img * rows * tw;
        scalar_t* plane = dst + p * oh * ow + 2 * ty0 * ow;
        for (int64_t ty = 0; ty < rows; ++ty) {
          for (int64_t a = 0; a < 4; ++a) {
            const scalar_t* __restrict__ m0 = in + 4 * a * stride + ty * tw;
            const scalar_t* __restrict__ m1 = m0 + stride;
            const scalar_t* __restrict__ m2 = m1 + stride;
            const scalar_t* __restrict__ m3 = m2 + stride;
            scalar_t* __restrict__ s0 = tmp.data() + 2 * a * tw;
            scalar_t* __restrict__ s1 = s0 + tw;
            for (int64_t t = 0; t < tw; ++t) {
              s0[t] = m0[t] + m1[t] + m2[t];
              s1[t] = m1[t] - m2[t] - m3[t];
            }
          }
          const scalar_t* c = tmp.data();
          scalar_t* __restrict__ top = plane + 2 * ty * ow;
          scalar_t* __restrict__ bottom = top + ow;
          for (int64_t t = 0; t < tw; ++t) {
            const scalar_t a0 = c[t], a1 = c[2 * tw + t], a2 = c[4 * tw + t], a3 = c[6 * tw + t];
            const scalar_t b0 = c[tw + t], b1 = c[3 * tw + t], b2 = c[5 * tw + t], b3 = c[7 * tw + t];
            top[2 * t] = a0 + a1 + a2 + offset;
            top[2 * t + 1] = b0 + b1 + b2 + offset;
            bottom[2 * t] = a1 - a2 - a3 + offset;
            bottom[2 * t + 1] = b1 - b2 - b3 + offset;
          }
        }
      }
    });
  });
}

// The transpose of output_transform (without the bias): band [ty0, ty0 + rows) of the output's
// gradient g (N, K, 2th, 2tw) -> the products' gradient gm (16, K, N*rows*tw).
void output_transform_adjoint(const at::Tensor& g, int64_t ty0, const at::Tensor& gm) {
  check_tensor(g, 4, "g");
  check_tensor(gm, 3, "gm");
  check_same(g, gm);
  const int64_t n_img = g.size(0), k_n = g.size(1), oh = g.size(2), ow = g.size(3);
  const Grid grid(oh + 2, ow + 2, kNone);
  TORCH_CHECK(gm.size(0) == 16 && gm.size(1) == k_n, "cut_native winograd: gm of shape ", gm.sizes(),
              " for ", k_n, " channels");
  const int64_t rows = band_rows(gm.size(2), n_img, grid, ty0), cols = gm.size(2), tw = grid.tw;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cut_native_output_transform_adjoint", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = gm.data_ptr<scalar_t>();
    const int64_t stride = k_n * cols;
    at::parallel_for(0, n_img * k_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(4 * ow);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / k_n, k = p % k_n;
        const scalar_t* plane = src + p * oh * ow + 2 * ty0 * ow;
        scalar_t* out = dst + k * cols + img * rows * tw;
        for (int64_t ty = 0; ty < rows; ++ty) {
          const scalar_t* __restrict__ g0 = plane + 2 * ty * ow;
          const scalar_t* __restrict__ g1 = g0 + ow;
          scalar_t* __restrict__ h0 = tmp.data();
          scalar_t* __restrict__ h1 = h0 + ow;
          scalar_t* __restrict__ h2 = h1 + ow;
          scalar_t* __restrict__ h3 = h2 + ow;
          for (int64_t i = 0; i < ow; ++i) {
            h0[i] = g0[i];
            h1[i] = g0[i] + g1[i];
            h2[i] = g0[i] - g1[i];
            h3[i] = -g1[i];
          }
          for (int64_t a = 0; a < 4; ++a) {
            const scalar_t* __restrict__ r = tmp.data() + a * ow;
            scalar_t* __restrict__ o0 = out + 4 * a * stride + ty * tw;
            scalar_t* __restrict__ o1 = o0 + stride;
            scalar_t* __restrict__ o2 = o1 + stride;
            scalar_t* __restrict__ o3 = o2 + stride;
            for (int64_t t = 0; t < tw; ++t) {
              const scalar_t e = r[2 * t], o = r[2 * t + 1];
              o0[t] = e;
              o1[t] = e + o;
              o2[t] = e - o;
              o3[t] = -o;
            }
          }
        }
      }
    });
  });
}

// Filter transform G w G^T of each 3x3 kernel: weight (K, C, 3, 3) -> U (16, K, C), with
// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]. Kernels go in blocks: the block is
// transposed so that every step is a loop over its kernels, and U's 16 rows (pairs apart, often a
// multiple of 4 KiB) are written in runs rather than one value at a time.
constexpr int64_t kPairBlock = 64;

at::Tensor filter_transform(const at::Tensor& weight) {
  check_tensor(weight, 4, "weight");
  TORCH_CHECK(weight.size(2) == 3 && weight.size(3) == 3, "cut_native winograd: weight must be 3x3, got ",
              weight.sizes());
  const int64_t pairs = weight.size(0) * weight.size(1);
  at::Tensor u = at::empty({16, weight.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "cut_native_filter_transform", [&] {
    const scalar_t* src = weight.const_data_ptr<scalar_t>();
    scalar_t* dst = u.data_ptr<scalar_t>();
    const scalar_t half = 0.5;
    const int64_t blocks = (pairs + kPairBlock - 1) / kPairBlock;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      scalar_t w[9][kPairBlock], r[12][kPairBlock], t[16][kPairBlock];  // w, G w, G w G^T
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t p0 = blk * kPairBlock, len = std::min(kPairBlock, pairs - p0);
        for (int64_t j = 0; j < len; ++j)
          for (int64_t k = 0; k < 9; ++k) w[k][j] = src[9 * (p0 + j) + k];
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t w0 = w[c][j], w1 = w[3 + c][j], w2 = w[6 + c][j];
            r[c][j] = w0;
            r[3 + c][j] = half * (w0 + w1 + w2);
            r[6 + c][j] = half * (w0 - w1 + w2);
            r[9 + c][j] = w2;
          }
        for (int64_t a = 0; a < 4; ++a)
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t r0 = r[3 * a][j], r1 = r[3 * a + 1][j], r2 = r[3 * a + 2][j];
            t[4 * a][j] = r0;
            t[4 * a + 1][j] = half * (r0 + r1 + r2);
            t[4 * a + 2][j] = half * (r0 - r1 + r2);
            t[4 * a + 3][j] = r2;
          }
        for (int64_t i = 0; i < 16; ++i) std::memcpy(dst + i * pairs + p0, t[i], len * sizeof(scalar_t));
      }
    });
  });
  return u;
}

// The transpose of filter_transform: U's gradient (16, K, C) -> the weight's (K, C, 3, 3).
at::Tensor filter_transform_adjoint(const at::Tensor& gu) {
  check_tensor(gu, 3, "gu");
  TORCH_CHECK(gu.size(0) == 16, "cut_native winograd: filter gradient of shape ", gu.sizes());
  const int64_t pairs = gu.size(1) * gu.size(2);
  at::Tensor gw = at::empty({gu.size(1), gu.size(2), 3, 3}, gu.options());
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "cut_native_filter_transform_adjoint", [&] {
    const scalar_t* src = gu.const_data_ptr<scalar_t>();
    scalar_t* dst = gw.data_ptr<scalar_t>();
    const scalar_t half = 0.5;
    const int64_t blocks = (pairs + kPairBlock - 1) / kPairBlock;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      scalar_t t[16][kPairBlock], r[12][kPairBlock], w[9][kPairBlock];
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t p0 = blk * kPairBlock, len = std::min(kPairBlock, pairs - p0);
        for (int64_t i = 0; i < 16; ++i) std::memcpy(t[i], src + i * pairs + p0, len * sizeof(scalar_t));
        for (int64_t a = 0; a < 4; ++a)
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t t0 = t[4 * a][j], t1 = t[4 * a + 1][j], t2 = t[4 * a + 2][j], t3 = t[4 * a + 3][j];
            r[3 * a][j] = t0 + half * (t1 + t2);
            r[3 * a + 1][j] = half * (t1 - t2);
            r[3 * a + 2][j] = t3 + half * (t1 + t2);
          }
        for (int64_t c = 0; c < 3; ++c)
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t r0 = r[c][j], r1 = r[3 + c][j], r2 = r[6 + c][j], r3 = r[9 + c][j];
            w[c][j] = r0 + half * (r1 + r2);
            w[3 + c][j] = half * (r1 - r2);
            w[6 + c][j] = r3 + half * (r1 + r2);
          }
        for (int64_t j = 0; j < len; ++j)
          for (int64_t k = 0; k < 9; ++k) dst[9 * (p0 + j) + k] = w[k][j];
      }
    });
  });
  return gw;
}

}  // namespace

TORCH_LIBRARY(cut_native, m) {
  m.def("winograd_input_transform(Tensor x, int pad, int ty0, Tensor(a!) v) -> ()", &input_transform);
  m.def("winograd_input_transform_adjoint(Tensor gv, int ty0, Tensor(a!) gx) -> ()", &input_transform_adjoint);
  m.def("winograd_output_transform(Tensor m, Tensor? bias, int ty0, Tensor(a!) out) -> ()", &output_transform);
  m.def("winograd_output_transform_adjoint(Tensor g, int ty0, Tensor(a!) gm) -> ()", &output_transform_adjoint);
  m.def("winograd_filter_transform(Tensor weight) -> Tensor", &filter_transform);
  m.def("winograd_filter_transform_adjoint(Tensor gu) -> Tensor", &filter_transform_adjoint);
}
