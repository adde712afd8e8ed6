// The transforms of the Winograd convolutions F(2x2, 3x3), F(4x4, 3x3) and F(2x2, 4x4) in
// cut/fast/winograd.py, as the operators torch.ops.cut_native.*. F(m x m, r x r) computes each m x m
// output tile from an a x a input tile d (a = m + r - 1) as A^T [(G w G^T) * (B^T d B)] A: a^2
// products per channel pair instead of r^2 m^2 (2.25x fewer for F(2, 3), 4x for F(4, 3), 2.56x
// for F(2, 4)). The map transforms are memory-bound:
// each is one pass, plane by plane (one channel of one image) in torch's thread pool, over a band
// of tile rows [ty0, ty0 + rows), so that the caller can run a large map band by band with
// cache-sized buffers. Layouts: maps are (N, C, H, W); the transformed tiles of a band are
// (P, C, N*rows*tw), the P = a^2 tile positions outermost, so the products are P matrix
// multiplies. Maps whose output is not a multiple of m are extended with zeros to whole tiles.
// Every adjoint is the exact transpose, for backward. Padding (one pixel, as the generator's
// convolutions use): 0 none, 1 reflect, 2 zeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

enum Pad : int64_t { kNone = 0, kReflect = 1, kZeros = 2 };

// The 1-D transforms of F(m, 3) (points 0, 1, -1 and for m = 4 also 2, -2, then infinity):
// input B^T (m+2 -> m+2), output A^T (m+2 -> m), filter G (3 -> m+2), and their transposes.
template <int M, int R>
struct Wino;

template <>
struct Wino<2, 3> {
  template <typename T>
  static inline void input(const T (&d)[4], T (&v)[4]) {
    v[0] = d[0] - d[2];
    v[1] = d[1] + d[2];
    v[2] = d[2] - d[1];
    v[3] = d[1] - d[3];
  }
  template <typename T>
  static inline void input_adjoint(const T (&g)[4], T (&d)[4]) {
    d[0] = g[0];
    d[1] = g[1] - g[2] + g[3];
    d[2] = g[1] + g[2] - g[0];
    d[3] = -g[3];
  }
  template <typename T>
  static inline void output(const T (&m)[4], T (&o)[2]) {
    o[0] = m[0] + m[1] + m[2];
    o[1] = m[1] - m[2] - m[3];
  }
  template <typename T>
  static inline void output_adjoint(const T (&g)[2], T (&m)[4]) {
    m[0] = g[0];
    m[1] = g[0] + g[1];
    m[2] = g[0] - g[1];
    m[3] = -g[1];
  }
  template <typename T>
  static inline void filter(const T (&w)[3], T (&u)[4]) {
    u[0] = w[0];
    u[1] = T(0.5) * (w[0] + w[1] + w[2]);
    u[2] = T(0.5) * (w[0] - w[1] + w[2]);
    u[3] = w[2];
  }
  template <typename T>
  static inline void filter_adjoint(const T (&u)[4], T (&w)[3]) {
    w[0] = u[0] + T(0.5) * (u[1] + u[2]);
    w[1] = T(0.5) * (u[1] - u[2]);
    w[2] = u[3] + T(0.5) * (u[1] + u[2]);
  }
};

template <>
struct Wino<4, 3> {
  template <typename T>
  static inline void input(const T (&d)[6], T (&v)[6]) {
    v[0] = T(4) * d[0] - T(5) * d[2] + d[4];
    v[1] = d[3] + d[4] - T(4) * (d[1] + d[2]);
    v[2] = d[4] - d[3] + T(4) * (d[1] - d[2]);
    v[3] = d[4] - d[2] + T(2) * (d[3] - d[1]);
    v[4] = d[4] - d[2] + T(2) * (d[1] - d[3]);
    v[5] = T(4) * d[1] - T(5) * d[3] + d[5];
  }
  template <typename T>
  static inline void input_adjoint(const T (&g)[6], T (&d)[6]) {
    d[0] = T(4) * g[0];
    d[1] = T(4) * (g[2] - g[1] + g[5]) + T(2) * (g[4] - g[3]);
    d[2] = -T(5) * g[0] - T(4) * (g[1] + g[2]) - g[3] - g[4];
    d[3] = g[1] - g[2] + T(2) * (g[3] - g[4]) - T(5) * g[5];
    d[4] = g[0] + g[1] + g[2] + g[3] + g[4];
    d[5] = g[5];
  }
  template <typename T>
  static inline void output(const T (&m)[6], T (&o)[4]) {
    const T s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + T(2) * d34;
    o[2] = s12 + T(4) * s34;
    o[3] = d12 + T(8) * d34 + m[5];
  }
  template <typename T>
  static inline void output_adjoint(const T (&g)[4], T (&m)[6]) {
    const T even = g[0] + g[2], odd = g[1] + g[3];
    m[0] = g[0];
    m[1] = even + odd;
    m[2] = even - odd;
    m[3] = g[0] + T(2) * g[1] + T(4) * g[2] + T(8) * g[3];
    m[4] = g[0] - T(2) * g[1] + T(4) * g[2] - T(8) * g[3];
    m[5] = g[3];
  }
  template <typename T>
  static inline void filter(const T (&w)[3], T (&u)[6]) {
    u[0] = w[0] / T(4);
    u[1] = -(w[0] + w[1] + w[2]) / T(6);
    u[2] = -(w[0] - w[1] + w[2]) / T(6);
    u[3] = w[0] / T(24) + w[1] / T(12) + w[2] / T(6);
    u[4] = w[0] / T(24) - w[1] / T(12) + w[2] / T(6);
    u[5] = w[2];
  }
  template <typename T>
  static inline void filter_adjoint(const T (&u)[6], T (&w)[3]) {
    w[0] = u[0] / T(4) - (u[1] + u[2]) / T(6) + (u[3] + u[4]) / T(24);
    w[1] = (u[2] - u[1]) / T(6) + (u[3] - u[4]) / T(12);
    w[2] = (u[3] + u[4] - u[1] - u[2]) / T(6) + u[5];
  }
};

// F(2, 4), for the discriminator's 4x4 kernels (points 0, 1, -1, 2, infinity).
template <>
struct Wino<2, 4> {
  template <typename T>
  static inline void input(const T (&d)[5], T (&v)[5]) {
    v[0] = T(2) * (d[0] - d[2]) + d[3] - d[1];
    v[1] = d[3] - d[2] - T(2) * d[1];
    v[2] = T(2) * d[1] - T(3) * d[2] + d[3];
    v[3] = d[3] - d[1];
    v[4] = T(2) * (d[1] - d[3]) - d[2] + d[4];
  }
  template <typename T>
  static inline void input_adjoint(const T (&g)[5], T (&d)[5]) {
    d[0] = T(2) * g[0];
    d[1] = T(2) * (g[2] - g[1] + g[4]) - g[0] - g[3];
    d[2] = -T(2) * g[0] - g[1] - T(3) * g[2] - g[4];
    d[3] = g[0] + g[1] + g[2] + g[3] - T(2) * g[4];
    d[4] = g[4];
  }
  template <typename T>
  static inline void output(const T (&m)[5], T (&o)[2]) {
    o[0] = m[0] + m[1] + m[2] + m[3];
    o[1] = m[1] - m[2] + T(2) * m[3] + m[4];
  }
  template <typename T>
  static inline void output_adjoint(const T (&g)[2], T (&m)[5]) {
    m[0] = g[0];
    m[1] = g[0] + g[1];
    m[2] = g[0] - g[1];
    m[3] = g[0] + T(2) * g[1];
    m[4] = g[1];
  }
  template <typename T>
  static inline void filter(const T (&w)[4], T (&u)[5]) {
    u[0] = w[0] / T(2);
    u[1] = -(w[0] + w[1] + w[2] + w[3]) / T(2);
    u[2] = (w[1] + w[3] - w[0] - w[2]) / T(6);
    u[3] = (w[0] + T(2) * w[1] + T(4) * w[2] + T(8) * w[3]) / T(6);
    u[4] = w[3];
  }
  template <typename T>
  static inline void filter_adjoint(const T (&u)[5], T (&w)[4]) {
    w[0] = (u[0] - u[1]) / T(2) + (u[3] - u[2]) / T(6);
    w[1] = u[3] / T(3) + u[2] / T(6) - u[1] / T(2);
    w[2] = T(2) * u[3] / T(3) - u[2] / T(6) - u[1] / T(2);
    w[3] = T(4) * u[3] / T(3) + u[2] / T(6) - u[1] / T(2) + u[4];
  }
};

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

// The tile grid of F(m, r) over a map: oh x ow outputs in th x tw tiles; the input, padded
// (hp x wp), is read as if extended with zeros to he x we = (m th + r - 1) x (m tw + r - 1).
struct Grid {
  int64_t oh, ow, th, tw, he, we;
  Grid(int64_t hp, int64_t wp, int64_t m, int64_t r) : oh(hp - r + 1), ow(wp - r + 1) {
    TORCH_CHECK(oh >= 1 && ow >= 1, "cut_native winograd: a ", hp, "x", wp, " input has no ", r, "x", r,
                " output");
    th = (oh + m - 1) / m;
    tw = (ow + m - 1) / m;
    he = m * th + r - 1;
    we = m * tw + r - 1;
  }
};

Grid padded_grid(int64_t h, int64_t w, int64_t pad, int64_t m, int64_t r) {
  TORCH_CHECK(pad >= kNone && pad <= kZeros, "cut_native winograd: unknown padding ", pad);
  TORCH_CHECK(pad != kReflect || (h >= 2 && w >= 2), "cut_native winograd: a map of ", h, "x", w,
              " is too small to reflect-pad");
  return pad ? Grid(h + 2, w + 2, m, r) : Grid(h, w, m, r);
}

// The band's tile rows: `cols` / (n_img * tw), checked against the grid.
int64_t band_rows(int64_t cols, int64_t n_img, const Grid& g, int64_t ty0) {
  TORCH_CHECK(n_img > 0 && cols % (n_img * g.tw) == 0, "cut_native winograd: ", cols,
              " tiles are not a band of ", n_img, " maps with ", g.tw, " tiles per row");
  const int64_t rows = cols / (n_img * g.tw);
  TORCH_CHECK(rows > 0 && ty0 >= 0 && ty0 + rows <= g.th, "cut_native winograd: tile rows [", ty0, ", ",
              ty0 + rows, ") outside 0..", g.th);
  return rows;
}

void check_positions(const at::Tensor& t, int64_t m, int64_t r, int64_t channels, const char* name) {
  const int64_t a = m + r - 1;
  TORCH_CHECK(t.size(0) == a * a && t.size(1) == channels, "cut_native winograd: ", name, " of shape ",
              t.sizes(), " is not (", a * a, ", ", channels, ", tiles)");
}

inline int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Rows [r0, r0 + count) of the padded map (h, w), extended with zeros to width we, into dst.
template <typename T>
void extended_rows(const T* src, int64_t h, int64_t w, int64_t pad, int64_t r0, int64_t count, int64_t we,
                   T* dst) {
  const int64_t hp = pad ? h + 2 : h, wp = pad ? w + 2 : w;
  for (int64_t r = r0; r < r0 + count; ++r) {
    T* d = dst + (r - r0) * we;
    const int64_t sr = pad ? r - 1 : r;
    if (r >= hp || (pad == kZeros && (sr < 0 || sr >= h))) {
      std::fill(d, d + we, T(0));
      continue;
    }
    const T* s = src + reflect(sr, h) * w;
    if (pad) {
      std::memcpy(d + 1, s, w * sizeof(T));
      d[0] = pad == kZeros ? T(0) : s[1];
      d[w + 1] = pad == kZeros ? T(0) : s[w - 2];
    } else {
      std::memcpy(d, s, w * sizeof(T));
    }
    std::fill(d + wp, d + we, T(0));
  }
}

// Band [ty0, ty0 + rows) of x (N, C, h, w), padded as `pad` says -> v (P, C, N*rows*tw).
template <int M, int R>
void input_transform_impl(const at::Tensor& x, int64_t pad, int64_t ty0, const at::Tensor& v) {
  constexpr int A = M + R - 1;
  const int64_t n_img = x.size(0), c_n = x.size(1), h = x.size(2), w = x.size(3);
  const Grid g = padded_grid(h, w, pad, M, R);
  check_positions(v, M, R, c_n, "v");
  const int64_t rows = band_rows(v.size(2), n_img, g, ty0), cols = v.size(2), we = g.we, tw = g.tw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cut_native_input_transform", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = v.data_ptr<scalar_t>();
    const int64_t stride = c_n * cols;  // between tile positions in v
    at::parallel_for(0, n_img * c_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> band((M * rows + R - 1) * we), tmp(A * we);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / c_n, c = p % c_n;
        extended_rows(src + p * h * w, h, w, pad, M * ty0, M * rows + R - 1, we, band.data());
        scalar_t* out = dst + c * cols + img * rows * tw;
        for (int64_t ty = 0; ty < rows; ++ty) {
          const scalar_t* d = band.data() + M * ty * we;
          for (int64_t i = 0; i < we; ++i) {  // B^T along y, every column
            scalar_t in[A], o[A];
            for (int k = 0; k < A; ++k) in[k] = d[k * we + i];
            Wino<M, R>::input(in, o);
            for (int k = 0; k < A; ++k) tmp[k * we + i] = o[k];
          }
          for (int a = 0; a < A; ++a) {  // B^T along x, every tile
            const scalar_t* r = tmp.data() + a * we;
            scalar_t* o = out + A * a * stride + ty * tw;
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t in[A], res[A];
              for (int k = 0; k < A; ++k) in[k] = r[M * t + k];
              Wino<M, R>::input(in, res);
              for (int b = 0; b < A; ++b) o[b * stride + t] = res[b];
            }
          }
        }
      }
    });
  });
}

// The transpose of input_transform for band [ty0, ty0 + rows): adds gv (P, C, N*rows*tw) into
// gx, the gradient of the padded map extended to whole tiles (N, C, he, we). The band's rows that
// no earlier band touched (all of them for ty0 = 0) are overwritten, so gx may start uninitialised.
template <int M, int R>
void input_transform_adjoint_impl(const at::Tensor& gv, int64_t ty0, const at::Tensor& gx) {
  constexpr int A = M + R - 1;
  const int64_t n_img = gx.size(0), c_n = gx.size(1);
  const Grid g(gx.size(2), gx.size(3), M, R);
  TORCH_CHECK(g.he == gx.size(2) && g.we == gx.size(3), "cut_native winograd: gx of shape ", gx.sizes(),
              " is not whole tiles of ", M);
  check_positions(gv, M, R, c_n, "gv");
  const int64_t rows = band_rows(gv.size(2), n_img, g, ty0), cols = gv.size(2), we = g.we, tw = g.tw;
  AT_DISPATCH_FLOATING_TYPES(gv.scalar_type(), "cut_native_input_transform_adjoint", [&] {
    const scalar_t* src = gv.const_data_ptr<scalar_t>();
    scalar_t* dst = gx.data_ptr<scalar_t>();
    const int64_t stride = c_n * cols;
    at::parallel_for(0, n_img * c_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(A * we);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / c_n, c = p % c_n;
        const scalar_t* in = src + c * cols + img * rows * tw;
        scalar_t* plane = dst + p * g.he * we + M * ty0 * we;
        const int64_t fresh = ty0 == 0 ? 0 : R - 1;  // rows the previous band already added to
        std::fill(plane + fresh * we, plane + (M * rows + R - 1) * we, scalar_t(0));
        for (int64_t ty = 0; ty < rows; ++ty) {
          std::fill(tmp.begin(), tmp.end(), scalar_t(0));
          for (int a = 0; a < A; ++a) {
            scalar_t* r = tmp.data() + a * we;
            const scalar_t* gi = in + A * a * stride + ty * tw;
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t gg[A], d[A];
              for (int b = 0; b < A; ++b) gg[b] = gi[b * stride + t];
              Wino<M, R>::input_adjoint(gg, d);
              for (int k = 0; k < A; ++k) r[M * t + k] += d[k];
            }
          }
          scalar_t* d = plane + M * ty * we;
          for (int64_t i = 0; i < we; ++i) {
            scalar_t gg[A], o[A];
            for (int k = 0; k < A; ++k) gg[k] = tmp[k * we + i];
            Wino<M, R>::input_adjoint(gg, o);
            for (int k = 0; k < A; ++k) d[k * we + i] += o[k];
          }
        }
      }
    });
  });
}

// Band [ty0, ty0 + rows) of the products m (P, K, N*rows*tw), plus bias (K) when given -> its
// output rows of out (N, K, oh, ow).
template <int M, int R>
void output_transform_impl(const at::Tensor& m, const std::optional<at::Tensor>& bias, int64_t ty0,
                           const at::Tensor& out) {
  constexpr int A = M + R - 1;
  const int64_t n_img = out.size(0), k_n = out.size(1), oh = out.size(2), ow = out.size(3);
  const Grid g(oh + R - 1, ow + R - 1, M, R);
  check_positions(m, M, R, k_n, "m");
  if (bias) {
    check_tensor(*bias, 1, "bias");
    check_same(*bias, m);
    TORCH_CHECK(bias->size(0) == k_n, "cut_native winograd: bias must have ", k_n, " elements");
  }
  const int64_t rows = band_rows(m.size(2), n_img, g, ty0), cols = m.size(2), tw = g.tw, wt = M * tw;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cut_native_output_transform", [&] {
    const scalar_t* src = m.const_data_ptr<scalar_t>();
    const scalar_t* b = bias ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = k_n * cols;
    at::parallel_for(0, n_img * k_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(A * M * tw), tile_rows(M * wt);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / k_n, k = p % k_n;
        const scalar_t offset = b ? b[k] : scalar_t(0);
        const scalar_t* in = src + k * cols + img * rows * tw;
        scalar_t* plane = dst + p * oh * ow;
        for (int64_t ty = 0; ty < rows; ++ty) {
          for (int a = 0; a < A; ++a) {  // A^T along x: tmp[a][j][t]
            const scalar_t* mi = in + A * a * stride + ty * tw;
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t mm[A], o[M];
              for (int bb = 0; bb < A; ++bb) mm[bb] = mi[bb * stride + t];
              Wino<M, R>::output(mm, o);
              for (int j = 0; j < M; ++j) tmp[(a * M + j) * tw + t] = o[j];
            }
          }
          for (int j = 0; j < M; ++j) {  // A^T along y, into M rows of whole tiles
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t mm[A], o[M];
              for (int a = 0; a < A; ++a) mm[a] = tmp[(a * M + j) * tw + t];
              Wino<M, R>::output(mm, o);
              for (int i = 0; i < M; ++i) tile_rows[i * wt + M * t + j] = o[i] + offset;
            }
          }
          const int64_t y0 = M * (ty0 + ty), valid = std::min<int64_t>(M, oh - y0);
          for (int64_t i = 0; i < valid; ++i)
            std::memcpy(plane + (y0 + i) * ow, tile_rows.data() + i * wt, ow * sizeof(scalar_t));
        }
      }
    });
  });
}

// The transpose of output_transform (without the bias): band [ty0, ty0 + rows) of the output's
// gradient g (N, K, oh, ow) -> the products' gradient gm (P, K, N*rows*tw).
template <int M, int R>
void output_transform_adjoint_impl(const at::Tensor& g, int64_t ty0, const at::Tensor& gm) {
  constexpr int A = M + R - 1;
  const int64_t n_img = g.size(0), k_n = g.size(1), oh = g.size(2), ow = g.size(3);
  const Grid grid(oh + R - 1, ow + R - 1, M, R);
  check_positions(gm, M, R, k_n, "gm");
  const int64_t rows = band_rows(gm.size(2), n_img, grid, ty0), cols = gm.size(2), tw = grid.tw;
  const int64_t wt = M * tw;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cut_native_output_transform_adjoint", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = gm.data_ptr<scalar_t>();
    const int64_t stride = k_n * cols;
    at::parallel_for(0, n_img * k_n, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tile_rows(M * wt, scalar_t(0)), tmp(A * M * tw);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t img = p / k_n, k = p % k_n;
        const scalar_t* plane = src + p * oh * ow;
        scalar_t* out = dst + k * cols + img * rows * tw;
        for (int64_t ty = 0; ty < rows; ++ty) {
          const int64_t y0 = M * (ty0 + ty), valid = std::min<int64_t>(M, oh - y0);
          for (int64_t i = 0; i < M; ++i) {  // zeros beyond the map: the extension's gradient
            scalar_t* row = tile_rows.data() + i * wt;
            if (i < valid) {
              std::memcpy(row, plane + (y0 + i) * ow, ow * sizeof(scalar_t));
              std::fill(row + ow, row + wt, scalar_t(0));
            } else {
              std::fill(row, row + wt, scalar_t(0));
            }
          }
          for (int j = 0; j < M; ++j) {  // A along y: tmp[a][j][t]
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t gg[M], mm[A];
              for (int i = 0; i < M; ++i) gg[i] = tile_rows[i * wt + M * t + j];
              Wino<M, R>::output_adjoint(gg, mm);
              for (int a = 0; a < A; ++a) tmp[(a * M + j) * tw + t] = mm[a];
            }
          }
          for (int a = 0; a < A; ++a) {  // A along x, every tile position
            scalar_t* o = out + A * a * stride + ty * tw;
            for (int64_t t = 0; t < tw; ++t) {
              scalar_t gg[M], mm[A];
              for (int j = 0; j < M; ++j) gg[j] = tmp[(a * M + j) * tw + t];
              Wino<M, R>::output_adjoint(gg, mm);
              for (int bb = 0; bb < A; ++bb) o[bb * stride + t] = mm[bb];
            }
          }
        }
      }
    });
  });
}

// Filter transform G w G^T of each 3x3 kernel: weight (K, C, 3, 3) -> U (P, K, C), in blocks of
// kernels so that U's P rows (pairs apart, often a multiple of 4 KiB) are written in runs.
constexpr int64_t kPairBlock = 64;

template <int M, int R>
at::Tensor filter_transform_impl(const at::Tensor& weight) {
  constexpr int A = M + R - 1;
  const int64_t pairs = weight.size(0) * weight.size(1);
  at::Tensor u = at::empty({A * A, weight.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "cut_native_filter_transform", [&] {
    const scalar_t* src = weight.const_data_ptr<scalar_t>();
    scalar_t* dst = u.data_ptr<scalar_t>();
    const int64_t blocks = (pairs + kPairBlock - 1) / kPairBlock;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> t(A * A * kPairBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t p0 = blk * kPairBlock, len = std::min(kPairBlock, pairs - p0);
        for (int64_t j = 0; j < len; ++j) {
          const scalar_t* w = src + R * R * (p0 + j);
          scalar_t cols[R][A];  // G along y of each column s
          for (int s = 0; s < R; ++s) {
            scalar_t col[R];
            for (int r = 0; r < R; ++r) col[r] = w[R * r + s];
            Wino<M, R>::filter(col, cols[s]);
          }
          for (int a = 0; a < A; ++a) {
            scalar_t row[R];
            for (int s = 0; s < R; ++s) row[s] = cols[s][a];
            scalar_t res[A];
            Wino<M, R>::filter(row, res);
            for (int b = 0; b < A; ++b) t[(A * a + b) * kPairBlock + j] = res[b];
          }
        }
        for (int64_t i = 0; i < A * A; ++i)
          std::memcpy(dst + i * pairs + p0, t.data() + i * kPairBlock, len * sizeof(scalar_t));
      }
    });
  });
  return u;
}

// The transpose of filter_transform: U's gradient (P, K, C) -> the weight's (K, C, 3, 3).
template <int M, int R>
at::Tensor filter_transform_adjoint_impl(const at::Tensor& gu) {
  constexpr int A = M + R - 1;
  const int64_t pairs = gu.size(1) * gu.size(2);
  at::Tensor gw = at::empty({gu.size(1), gu.size(2), R, R}, gu.options());
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "cut_native_filter_transform_adjoint", [&] {
    const scalar_t* src = gu.const_data_ptr<scalar_t>();
    scalar_t* dst = gw.data_ptr<scalar_t>();
    const int64_t blocks = (pairs + kPairBlock - 1) / kPairBlock;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> t(A * A * kPairBlock);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t p0 = blk * kPairBlock, len = std::min(kPairBlock, pairs - p0);
        for (int64_t i = 0; i < A * A; ++i)
          std::memcpy(t.data() + i * kPairBlock, src + i * pairs + p0, len * sizeof(scalar_t));
        for (int64_t j = 0; j < len; ++j) {
          scalar_t cols[R][A];  // G^T along x of each row a
          for (int a = 0; a < A; ++a) {
            scalar_t row[A], res[R];
            for (int b = 0; b < A; ++b) row[b] = t[(A * a + b) * kPairBlock + j];
            Wino<M, R>::filter_adjoint(row, res);
            for (int s = 0; s < R; ++s) cols[s][a] = res[s];
          }
          scalar_t* w = dst + R * R * (p0 + j);
          for (int s = 0; s < R; ++s) {
            scalar_t res[R];
            Wino<M, R>::filter_adjoint(cols[s], res);
            for (int r = 0; r < R; ++r) w[R * r + s] = res[r];
          }
        }
      }
    });
  });
  return gw;
}

// An operator's input and output: both contiguous CPU float tensors of one dtype.
void check_pair(const at::Tensor& a, int64_t a_dim, const char* a_name, const at::Tensor& b, int64_t b_dim,
                const char* b_name) {
  check_tensor(a, a_dim, a_name);
  check_tensor(b, b_dim, b_name);
  check_same(a, b);
}

// Calls f(M, R) as compile-time constants for the transforms there are.
template <typename F>
void with_tile(int64_t m, int64_t r, F&& f) {
  using std::integral_constant;
  if (m == 2 && r == 3) {
    f(integral_constant<int, 2>{}, integral_constant<int, 3>{});
  } else if (m == 4 && r == 3) {
    f(integral_constant<int, 4>{}, integral_constant<int, 3>{});
  } else if (m == 2 && r == 4) {
    f(integral_constant<int, 2>{}, integral_constant<int, 4>{});
  } else {
    TORCH_CHECK(false, "cut_native winograd: no F(", m, "x", m, ", ", r, "x", r,
                ") transforms; there are F(2x2, 3x3), F(4x4, 3x3) and F(2x2, 4x4)");
  }
}

void input_transform(const at::Tensor& x, int64_t m, int64_t r, int64_t pad, int64_t ty0, const at::Tensor& v) {
  check_pair(x, 4, "x", v, 3, "v");
  with_tile(m, r, [&](auto mc, auto rc) { input_transform_impl<mc.value, rc.value>(x, pad, ty0, v); });
}

void input_transform_adjoint(const at::Tensor& gv, int64_t m, int64_t r, int64_t ty0, const at::Tensor& gx) {
  check_pair(gv, 3, "gv", gx, 4, "gx");
  with_tile(m, r, [&](auto mc, auto rc) { input_transform_adjoint_impl<mc.value, rc.value>(gv, ty0, gx); });
}

void output_transform(const at::Tensor& mm, int64_t m, int64_t r, const std::optional<at::Tensor>& bias,
                      int64_t ty0, const at::Tensor& out) {
  check_pair(mm, 3, "m", out, 4, "out");
  with_tile(m, r, [&](auto mc, auto rc) { output_transform_impl<mc.value, rc.value>(mm, bias, ty0, out); });
}

void output_transform_adjoint(const at::Tensor& g, int64_t m, int64_t r, int64_t ty0, const at::Tensor& gm) {
  check_pair(g, 4, "g", gm, 3, "gm");
  with_tile(m, r, [&](auto mc, auto rc) { output_transform_adjoint_impl<mc.value, rc.value>(g, ty0, gm); });
}

at::Tensor filter_transform(const at::Tensor& weight, int64_t m) {
  check_tensor(weight, 4, "weight");
  const int64_t r = weight.size(2);
  TORCH_CHECK(weight.size(3) == r, "cut_native winograd: weight must be square, got ", weight.sizes());
  at::Tensor u;
  with_tile(m, r, [&](auto mc, auto rc) { u = filter_transform_impl<mc.value, rc.value>(weight); });
  return u;
}

at::Tensor filter_transform_adjoint(const at::Tensor& gu, int64_t m, int64_t r) {
  check_tensor(gu, 3, "gu");
  TORCH_CHECK(gu.size(0) == (m + r - 1) * (m + r - 1), "cut_native winograd: filter gradient of shape ",
              gu.sizes(), " for F(", m, "x", m, ", ", r, "x", r, ")");
  at::Tensor gw;
  with_tile(m, r, [&](auto mc, auto rc) { gw = filter_transform_adjoint_impl<mc.value, rc.value>(gu); });
  return gw;
}

}  // namespace

TORCH_LIBRARY(cut_native, m) {
  m.def("winograd_input_transform(Tensor x, int m, int r, int pad, int ty0, Tensor(a!) v) -> ()",
        &input_transform);
  m.def("winograd_input_transform_adjoint(Tensor gv, int m, int r, int ty0, Tensor(a!) gx) -> ()",
        &input_transform_adjoint);
  m.def("winograd_output_transform(Tensor mm, int m, int r, Tensor? bias, int ty0, Tensor(a!) out) -> ()",
        &output_transform);
  m.def("winograd_output_transform_adjoint(Tensor g, int m, int r, int ty0, Tensor(a!) gm) -> ()",
        &output_transform_adjoint);
  m.def("winograd_filter_transform(Tensor weight, int m) -> Tensor", &filter_transform);
  m.def("winograd_filter_transform_adjoint(Tensor gu, int m, int r) -> Tensor", &filter_transform_adjoint);
}
