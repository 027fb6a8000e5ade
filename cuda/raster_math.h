// Per-element math of the rasterizer, written once for the CUDA kernels (raster_kernels.cu) and
// the CPU path (raster_ops.cpp's projection, raster_host.cpp's binning). It mirrors the PyTorch reference in
// gsavatar/render/_torch_impl.py function by function; the comments name the reference function.
// No torch headers here: nvcc compiles this without them.
#pragma once

#include <cmath>

#include "gsa_common.h"

namespace gsa {

constexpr float kAlphaMin = 1.0f / 255.0f;  // contributions with alpha <= this are skipped
constexpr float kAlphaMax = 0.99f;          // alpha is capped here (transmittance never reaches 0)
constexpr float kSkipPower = -5.55f;        // below this exponent alpha < 1/255 for any opacity <= 1
constexpr int kTile = 16;                   // tile side in pixels (one CUDA block of 16 x 16 threads)
constexpr int kMaxChannels = 8;             // feature channels per Gaussian (colour + depth + spare)

// SH basis constants of 3DGS (the same as _torch_impl.SH_C*).
constexpr float kShC0 = 0.28209479177387814f;
constexpr float kShC1 = 0.4886025119029199f;
// (Scalars, not arrays: constexpr arrays are not usable in device code.)
constexpr float kShC2_0 = 1.0925484305920792f;
constexpr float kShC2_1 = -1.0925484305920792f;
constexpr float kShC2_2 = 0.31539156525252005f;
constexpr float kShC2_3 = -1.0925484305920792f;
constexpr float kShC2_4 = 0.5462742152960396f;
constexpr float kShC3_0 = -0.5900435899266435f;
constexpr float kShC3_1 = 2.890611442640554f;
constexpr float kShC3_2 = -0.4570457994644658f;
constexpr float kShC3_3 = 0.3731763325901154f;
constexpr float kShC3_4 = -0.4570457994644658f;
constexpr float kShC3_5 = 1.445305721320277f;
constexpr float kShC3_6 = -0.5900435899266435f;

// One pinhole camera: viewmat rows (world -> camera, OpenCV axes) and intrinsics, with the
// field-of-view limits the projection's Jacobian is clamped to.
struct Camera {
  float R[9];  // row-major rotation of the viewmat
  float t[3];
  float fx, fy, cx, cy;
  float lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
  int width, height;
};

// viewmat: 16 floats row-major; K: 9 floats row-major.
GSA_HD Camera make_camera(const float* viewmat, const float* K, int width, int height) {
  Camera c;
  for (int r = 0; r < 3; ++r) {
    for (int k = 0; k < 3; ++k) c.R[3 * r + k] = viewmat[4 * r + k];
    c.t[r] = viewmat[4 * r + 3];
  }
  c.fx = K[0];
  c.fy = K[4];
  c.cx = K[2];
  c.cy = K[5];
  c.width = width;
  c.height = height;
  // As _fully_fused_projection: 1.3 tan(fov / 2) for a centred principal point.
  const float tan_x = 0.5f * width / c.fx, tan_y = 0.5f * height / c.fy;
  c.lim_x_pos = (width - c.cx) / c.fx + 0.3f * tan_x;
  c.lim_x_neg = c.cx / c.fx + 0.3f * tan_x;
  c.lim_y_pos = (height - c.cy) / c.fy + 0.3f * tan_y;
  c.lim_y_neg = c.cy / c.fy + 0.3f * tan_y;
  return c;
}

// Camera centre -R^T t (the SH viewing directions start there).
GSA_HD void camera_centre(const Camera& c, float out[3]) {
  for (int k = 0; k < 3; ++k) out[k] = -(c.R[k] * c.t[0] + c.R[3 + k] * c.t[1] + c.R[6 + k] * c.t[2]);
}

// _quat_to_rotmat: (w, x, y, z), normalised with |q|^2 clamped at 1e-24. Also returns the
// normalised quaternion and 1 / |q| for the backward pass.
GSA_HD void quat_to_rotmat(const float* q_in, float R[9], float q[4], float& inv_norm) {
  const float n2 = q_in[0] * q_in[0] + q_in[1] * q_in[1] + q_in[2] * q_in[2] + q_in[3] * q_in[3];
  inv_norm = 1.0f / sqrtf(fmaxf(n2, 1e-24f));
  for (int k = 0; k < 4; ++k) q[k] = q_in[k] * inv_norm;
  const float w = q[0], x = q[1], y = q[2], z = q[3];
  R[0] = 1 - 2 * (y * y + z * z); R[1] = 2 * (x * y - w * z);     R[2] = 2 * (x * z + w * y);
  R[3] = 2 * (x * y + w * z);     R[4] = 1 - 2 * (x * x + z * z); R[5] = 2 * (y * z - w * x);
  R[6] = 2 * (x * z - w * y);     R[7] = 2 * (y * z + w * x);     R[8] = 1 - 2 * (x * x + y * y);
}

// Gradient of quat_to_rotmat: v_R (row-major) -> gradient w.r.t. the unnormalised input quaternion.
GSA_HD void quat_to_rotmat_vjp(const float q[4], float inv_norm, bool clamped, const float g[9], float v_q[4]) {
  const float w = q[0], x = q[1], y = q[2], z = q[3];
  float vn[4];
  vn[0] = 2 * (-z * g[1] + y * g[2] + z * g[3] - x * g[5] - y * g[6] + x * g[7]);
  vn[1] = 2 * (y * g[1] + z * g[2] + y * g[3] - 2 * x * g[4] - w * g[5] + z * g[6] + w * g[7] - 2 * x * g[8]);
  vn[2] = 2 * (-2 * y * g[0] + x * g[1] + w * g[2] + x * g[3] + z * g[5] - w * g[6] + z * g[7] - 2 * y * g[8]);
  vn[3] = 2 * (-2 * z * g[0] - w * g[1] + x * g[2] + w * g[3] - 2 * z * g[4] + y * g[5] + x * g[6] + y * g[7]);
  // q_hat = q / |q|: d q_hat = (I - q_hat q_hat^T) dq / |q| (no normalisation gradient when clamped).
  const float dot = clamped ? 0.0f : (q[0] * vn[0] + q[1] * vn[1] + q[2] * vn[2] + q[3] * vn[3]);
  for (int k = 0; k < 4; ++k) v_q[k] = (vn[k] - q[k] * dot) * inv_norm;
}

// What project_gaussian computes for one Gaussian (the fields of ProjectedGaussians).
struct Projected {
  float u, v;         // means2d (pixels)
  float A, B, C;      // conic: inverse 2-D covariance [[A, B], [B, C]]
  float a, b, c;      // 2-D covariance (eps2d included)
  float depth;        // camera z
  float radius;       // ceil(3 sqrt(largest eigenvalue)), 0 where not visible
};

// Intermediate values the backward pass reuses (recomputed there, never stored).
struct ProjectionState {
  float p[3];             // camera-space mean
  float z;                // depth used for the division (1 when out of the depth range)
  float xz, yz;           // x / z, y / z
  bool x_clamped, y_clamped;
  float J[6];             // 2x3 Jacobian, row-major
  float T[6];             // J W (2x3)
  float Rq[9], q[4], inv_norm;  // rotation of the quaternion, normalised quaternion, 1 / |q|
  bool q_clamped;
  float F[6];             // J W R S (2x3)
  float det;
};

// _fully_fused_projection for one Gaussian. Returns whether it is visible.
GSA_HD bool project_gaussian(const float* mean, const float* quat, const float* scale, const Camera& cam,
                             float eps2d, float near_plane, float far_plane, Projected& out, ProjectionState& s) {
  for (int r = 0; r < 3; ++r)
    s.p[r] = cam.R[3 * r] * mean[0] + cam.R[3 * r + 1] * mean[1] + cam.R[3 * r + 2] * mean[2] + cam.t[r];
  const float depth = s.p[2];
  const bool in_depth = depth >= near_plane && depth <= far_plane;
  s.z = in_depth ? depth : 1.0f;
  s.xz = s.p[0] / s.z;
  s.yz = s.p[1] / s.z;
  out.u = cam.fx * s.xz + cam.cx;
  out.v = cam.fy * s.yz + cam.cy;
  out.depth = depth;
  const float xzc = fminf(fmaxf(s.xz, -cam.lim_x_neg), cam.lim_x_pos);
  const float yzc = fminf(fmaxf(s.yz, -cam.lim_y_neg), cam.lim_y_pos);
  s.x_clamped = xzc != s.xz;
  s.y_clamped = yzc != s.yz;
  s.J[0] = cam.fx / s.z; s.J[1] = 0.0f;         s.J[2] = -cam.fx * xzc / s.z;
  s.J[3] = 0.0f;         s.J[4] = cam.fy / s.z; s.J[5] = -cam.fy * yzc / s.z;
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 3; ++k)
      s.T[3 * r + k] = s.J[3 * r] * cam.R[k] + s.J[3 * r + 1] * cam.R[3 + k] + s.J[3 * r + 2] * cam.R[6 + k];
  const float n2 = quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3];
  s.q_clamped = !(n2 > 1e-24f);
  quat_to_rotmat(quat, s.Rq, s.q, s.inv_norm);
  // F = T (Rq diag(scale))
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 3; ++k)
      s.F[3 * r + k] = (s.T[3 * r] * s.Rq[k] + s.T[3 * r + 1] * s.Rq[3 + k] + s.T[3 * r + 2] * s.Rq[6 + k]) * scale[k];
  out.a = s.F[0] * s.F[0] + s.F[1] * s.F[1] + s.F[2] * s.F[2] + eps2d;
  out.b = s.F[0] * s.F[3] + s.F[1] * s.F[4] + s.F[2] * s.F[5];
  out.c = s.F[3] * s.F[3] + s.F[4] * s.F[4] + s.F[5] * s.F[5] + eps2d;
  const float det = out.a * out.c - out.b * out.b;
  const bool good_det = det > 0.0f;
  s.det = good_det ? det : 1.0f;
  out.A = out.c / s.det;
  out.B = -out.b / s.det;
  out.C = out.a / s.det;
  const float mid = 0.5f * (out.a + out.c);
  const float lam_max = mid + sqrtf(fmaxf(mid * mid - s.det, 0.0f));
  const float sigma_max = sqrtf(lam_max);
  float radius = ceilf(3.0f * sigma_max);
  if (radius != radius) radius = 0.0f;  // NaN
  radius = fminf(fmaxf(radius, 0.0f), 1e9f);
  // Culled only when the 1/255 contour of a fully opaque Gaussian (3.33 sigma) misses the image;
  // binning decides exactly which pixels it reaches (as the reference's CULL_SIGMAS).
  float reach = ceilf(3.33f * sigma_max);
  if (reach != reach) reach = 0.0f;  // NaN
  reach = fminf(fmaxf(reach, 0.0f), 1e9f);
  const bool on_image = out.u + reach > 0 && out.u - reach < cam.width && out.v + reach > 0 &&
                        out.v - reach < cam.height;
  const bool visible = in_depth && good_det && on_image && radius > 0;
  out.radius = visible ? radius : 0.0f;
  return visible;
}

// Gradient of project_gaussian w.r.t. the mean, quaternion and scale of a *visible* Gaussian,
// given the gradients of (u, v), the conic (A, B, C) and the depth. The camera gets no gradient
// here (the compiled backends treat viewmat and K as constants).
GSA_HD void project_gaussian_vjp(const float* scale, const Camera& cam, const Projected& pr, const ProjectionState& s,
                                 const float v_uv[2], const float v_conic[3], float v_depth, float v_mean[3],
                                 float v_quat[4], float v_scale[3]) {
  const float a = pr.a, b = pr.b, c = pr.c, d2 = s.det * s.det;
  const float vA = v_conic[0], vB = v_conic[1], vC = v_conic[2];
  // A = c / det, B = -b / det, C = a / det with det = a c - b^2.
  const float v_a = (-c * c * vA + b * c * vB - b * b * vC) / d2;
  const float v_b = (2 * b * c * vA - (a * c + b * b) * vB + 2 * a * b * vC) / d2;
  const float v_c = (-b * b * vA + a * b * vB - a * a * vC) / d2;
  // a = F0.F0, b = F0.F1, c = F1.F1 (+ eps2d)
  float vF[6];
  for (int k = 0; k < 3; ++k) {
    vF[k] = 2 * v_a * s.F[k] + v_b * s.F[3 + k];
    vF[3 + k] = v_b * s.F[k] + 2 * v_c * s.F[3 + k];
  }
  // F = T M with M = Rq diag(scale): v_M = T^T vF, v_T = vF M^T.
  float vM[9];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) vM[3 * i + k] = s.T[i] * vF[k] + s.T[3 + i] * vF[3 + k];
  float vRq[9];
  for (int k = 0; k < 3; ++k) {
    float acc = 0.0f;
    for (int i = 0; i < 3; ++i) {
      vRq[3 * i + k] = vM[3 * i + k] * scale[k];
      acc += vM[3 * i + k] * s.Rq[3 * i + k];
    }
    v_scale[k] = acc;
  }
  quat_to_rotmat_vjp(s.q, s.inv_norm, s.q_clamped, vRq, v_quat);
  float vT[6];
  for (int r = 0; r < 2; ++r)
    for (int i = 0; i < 3; ++i) {
      float acc = 0.0f;
      for (int k = 0; k < 3; ++k) acc += vF[3 * r + k] * s.Rq[3 * i + k] * scale[k];
      vT[3 * r + i] = acc;
    }
  // T = J W: v_J = v_T W^T (only the non-zero entries J00, J02, J11, J12 matter).
  float vJ[6];
  for (int r = 0; r < 2; ++r)
    for (int k = 0; k < 3; ++k)
      vJ[3 * r + k] = vT[3 * r] * cam.R[3 * k] + vT[3 * r + 1] * cam.R[3 * k + 1] + vT[3 * r + 2] * cam.R[3 * k + 2];
  const float z = s.z, x = s.p[0], y = s.p[1];
  const float xzc = -s.J[2] * z / cam.fx, yzc = -s.J[5] * z / cam.fy;
  float v_p[3] = {0.0f, 0.0f, v_depth};
  // u = fx x / z + cx, v = fy y / z + cy
  v_p[0] += v_uv[0] * cam.fx / z;
  v_p[1] += v_uv[1] * cam.fy / z;
  v_p[2] -= (v_uv[0] * cam.fx * x + v_uv[1] * cam.fy * y) / (z * z);
  // J00 = fx / z, J11 = fy / z, J02 = -fx xzc / z, J12 = -fy yzc / z with xzc = clamp(x / z).
  v_p[2] += -vJ[0] * cam.fx / (z * z) - vJ[4] * cam.fy / (z * z) + vJ[2] * cam.fx * xzc / (z * z) +
            vJ[5] * cam.fy * yzc / (z * z);
  if (!s.x_clamped) {
    const float v_xz = -vJ[2] * cam.fx / z;
    v_p[0] += v_xz / z;
    v_p[2] -= v_xz * x / (z * z);
  }
  if (!s.y_clamped) {
    const float v_yz = -vJ[5] * cam.fy / z;
    v_p[1] += v_yz / z;
    v_p[2] -= v_yz * y / (z * z);
  }
  // p = W mean + t
  for (int k = 0; k < 3; ++k) v_mean[k] = cam.R[k] * v_p[0] + cam.R[3 + k] * v_p[1] + cam.R[6 + k] * v_p[2];
}

// ---------------------------------------------------------------------------------------------
// Spherical harmonics (_spherical_harmonics, _sh_basis)
// ---------------------------------------------------------------------------------------------

// The (degree + 1)^2 basis values at the unit direction (x, y, z).
GSA_HD void sh_basis(int degree, float x, float y, float z, float basis[16]) {
  basis[0] = kShC0;
  if (degree < 1) return;
  basis[1] = -kShC1 * y;
  basis[2] = kShC1 * z;
  basis[3] = -kShC1 * x;
  if (degree < 2) return;
  const float xx = x * x, yy = y * y, zz = z * z;
  basis[4] = kShC2_0 * x * y;
  basis[5] = kShC2_1 * y * z;
  basis[6] = kShC2_2 * (2 * zz - xx - yy);
  basis[7] = kShC2_3 * x * z;
  basis[8] = kShC2_4 * (xx - yy);
  if (degree < 3) return;
  basis[9] = kShC3_0 * y * (3 * xx - yy);
  basis[10] = kShC3_1 * x * y * z;
  basis[11] = kShC3_2 * y * (4 * zz - xx - yy);
  basis[12] = kShC3_3 * z * (2 * zz - 3 * xx - 3 * yy);
  basis[13] = kShC3_4 * x * (4 * zz - xx - yy);
  basis[14] = kShC3_5 * z * (xx - yy);
  basis[15] = kShC3_6 * x * (xx - 3 * yy);
}

// Gradient of sh_basis w.r.t. the unit direction, given the gradients of the basis values.
GSA_HD void sh_basis_vjp(int degree, float x, float y, float z, const float g[16], float v_dir[3]) {
  float vx = 0.0f, vy = 0.0f, vz = 0.0f;
  if (degree >= 1) {
    vy += -kShC1 * g[1];
    vz += kShC1 * g[2];
    vx += -kShC1 * g[3];
  }
  if (degree >= 2) {
    vx += kShC2_0 * y * g[4];
    vy += kShC2_0 * x * g[4];
    vy += kShC2_1 * z * g[5];
    vz += kShC2_1 * y * g[5];
    vx += -2 * kShC2_2 * x * g[6];
    vy += -2 * kShC2_2 * y * g[6];
    vz += 4 * kShC2_2 * z * g[6];
    vx += kShC2_3 * z * g[7];
    vz += kShC2_3 * x * g[7];
    vx += 2 * kShC2_4 * x * g[8];
    vy += -2 * kShC2_4 * y * g[8];
  }
  if (degree >= 3) {
    const float xx = x * x, yy = y * y, zz = z * z;
    vx += kShC3_0 * 6 * x * y * g[9];
    vy += kShC3_0 * (3 * xx - 3 * yy) * g[9];
    vx += kShC3_1 * y * z * g[10];
    vy += kShC3_1 * x * z * g[10];
    vz += kShC3_1 * x * y * g[10];
    vx += kShC3_2 * (-2 * x * y) * g[11];
    vy += kShC3_2 * (4 * zz - xx - 3 * yy) * g[11];
    vz += kShC3_2 * 8 * y * z * g[11];
    vx += kShC3_3 * (-6 * x * z) * g[12];
    vy += kShC3_3 * (-6 * y * z) * g[12];
    vz += kShC3_3 * (6 * zz - 3 * xx - 3 * yy) * g[12];
    vx += kShC3_4 * (4 * zz - 3 * xx - yy) * g[13];
    vy += kShC3_4 * (-2 * x * y) * g[13];
    vz += kShC3_4 * 8 * x * z * g[13];
    vx += kShC3_5 * 2 * x * z * g[14];
    vy += kShC3_5 * (-2 * y * z) * g[14];
    vz += kShC3_5 * (xx - yy) * g[14];
    vx += kShC3_6 * (3 * xx - 3 * yy) * g[15];
    vy += kShC3_6 * (-6 * x * y) * g[15];
  }
  v_dir[0] = vx;
  v_dir[1] = vy;
  v_dir[2] = vz;
}

// Colour max(sh(dir) + 0.5, 0) of one Gaussian. coeffs: [K, 3] (only the first (degree+1)^2 used).
GSA_HD void sh_color(int degree, const float* coeffs, const float dir[3], float color[3]) {
  const float n = sqrtf(fmaxf(dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2], 1e-20f));
  float basis[16];
  sh_basis(degree, dir[0] / n, dir[1] / n, dir[2] / n, basis);
  const int count = (degree + 1) * (degree + 1);
  for (int ch = 0; ch < 3; ++ch) {
    float acc = 0.0f;
    for (int k = 0; k < count; ++k) acc += basis[k] * coeffs[3 * k + ch];
    color[ch] = fmaxf(acc + 0.5f, 0.0f);
  }
}

// Gradient of sh_color: v_coeffs (first (degree+1)^2 rows written) and the gradient w.r.t. dir.
GSA_HD void sh_color_vjp(int degree, const float* coeffs, const float dir[3], const float v_color[3], float* v_coeffs,
                         float v_dir[3]) {
  const float n2 = dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2];
  const float n = sqrtf(fmaxf(n2, 1e-20f));
  const float d[3] = {dir[0] / n, dir[1] / n, dir[2] / n};
  float basis[16];
  sh_basis(degree, d[0], d[1], d[2], basis);
  const int count = (degree + 1) * (degree + 1);
  float v_raw[3];
  for (int ch = 0; ch < 3; ++ch) {
    float acc = 0.0f;
    for (int k = 0; k < count; ++k) acc += basis[k] * coeffs[3 * k + ch];
    v_raw[ch] = acc + 0.5f >= 0.0f ? v_color[ch] : 0.0f;  // clamp_min passes the gradient at the bound
  }
  float g[16];
  for (int k = 0; k < count; ++k) {
    g[k] = 0.0f;
    for (int ch = 0; ch < 3; ++ch) {
      v_coeffs[3 * k + ch] = basis[k] * v_raw[ch];
      g[k] += coeffs[3 * k + ch] * v_raw[ch];
    }
  }
  float v_d[3];
  sh_basis_vjp(degree, d[0], d[1], d[2], g, v_d);
  const float dot = n2 > 1e-20f ? d[0] * v_d[0] + d[1] * v_d[1] + d[2] * v_d[2] : 0.0f;
  for (int k = 0; k < 3; ++k) v_dir[k] = (v_d[k] - d[k] * dot) / n;
}

// ---------------------------------------------------------------------------------------------
// Tile binning (_isect_tiles)
// ---------------------------------------------------------------------------------------------

// The tiles [tx0, tx1] x [ty0, ty1] holding a pixel centre inside the bounding box of the ellipse
// where opacity * exp(-d^T Sigma^-1 d / 2) > 1/255. Returns false when there are none.
GSA_HD bool tile_range(float u, float v, float cov_xx, float cov_yy, float opacity, int width, int height,
                       int& tx0, int& tx1, int& ty0, int& ty1) {
  if (!(opacity > kAlphaMin)) return false;
  const float k = sqrtf(2.0f * logf(opacity / kAlphaMin));
  const float half_x = k * sqrtf(fmaxf(cov_xx, 0.0f)) * (1.0f + 1e-4f) + 1e-3f;
  const float half_y = k * sqrtf(fmaxf(cov_yy, 0.0f)) * (1.0f + 1e-4f) + 1e-3f;
  const float big = static_cast<float>((width > height ? width : height) + 1);
  // Pixel (row i, col j) has its centre at (j + 0.5, i + 0.5).
  const int j0 = imax(static_cast<int>(ceilf(fminf(fmaxf(u - half_x - 0.5f, -1.0f), big))), 0);
  const int j1 = imin(static_cast<int>(floorf(fminf(fmaxf(u + half_x - 0.5f, -1.0f), big))), width - 1);
  const int i0 = imax(static_cast<int>(ceilf(fminf(fmaxf(v - half_y - 0.5f, -1.0f), big))), 0);
  const int i1 = imin(static_cast<int>(floorf(fminf(fmaxf(v + half_y - 0.5f, -1.0f), big))), height - 1);
  if (j1 < j0 || i1 < i0) return false;
  tx0 = j0 / kTile;
  tx1 = j1 / kTile;
  ty0 = i0 / kTile;
  ty1 = i1 / kTile;
  return true;
}

// Sort key of a (tile, Gaussian) pair: the tile (image-major) in the high 32 bits, the depth's
// float bits in the low 32 (positive floats order like their bit patterns; visible depths >= near > 0).
GSA_HD int64_t isect_key(int64_t tile, float depth) {
  union {
    float f;
    uint32_t u;
  } bits;
  bits.f = depth;
  return (tile << 32) | static_cast<int64_t>(bits.u);
}

// ---------------------------------------------------------------------------------------------
// Per-pixel compositing (_RasterizeToPixels)
// ---------------------------------------------------------------------------------------------

// Alpha of one Gaussian (mean (u, v), conic (A, B, C), opacity o) at the pixel centre (px, py):
// min(0.99, o exp(-(A dx^2 + 2 B dx dy + C dy^2) / 2)), or 0 when it is <= 1/255 (skipped).
// `capped` tells whether the cap was hit (the alpha then has no gradient w.r.t. the Gaussian).
GSA_HD float pixel_alpha(float dx, float dy, float A, float B, float C, float o, bool& capped) {
  const float power = -0.5f * (A * dx * dx + C * dy * dy) - B * dx * dy;
  // exp(-5.55) = 0.00389 < 1/255: with o <= 1 the pair is skipped whatever expf rounds to, so skip
  // the exp (most pairs of a tile lie outside the Gaussian's 1/255 ellipse).
  capped = false;
  if (power < kSkipPower && o <= 1.0f) return 0.0f;
  const float raw = o * expf(power);
  capped = raw >= kAlphaMax;
  const float alpha = capped ? kAlphaMax : raw;
  return alpha > kAlphaMin ? alpha : 0.0f;
}

// Gradients of one (pixel, Gaussian) pair in the front-to-back backward pass.
struct PairGrad {
  float u, v, A, B, C, o;
};

// With v_alpha = dL/d(alpha of this pair): the gradients w.r.t. the Gaussian's parameters.
GSA_HD PairGrad pixel_alpha_vjp(float dx, float dy, float A, float B, float C, float o, float alpha, bool capped,
                                float v_alpha) {
  PairGrad g;
  // alpha = o exp(power): d alpha / d power = alpha, d alpha / d o = alpha / o (none at the cap).
  const float g_power = capped ? 0.0f : alpha * v_alpha;
  g.o = g_power / o;
  g.u = g_power * (A * dx + B * dy);
  g.v = g_power * (B * dx + C * dy);
  g.A = -0.5f * g_power * dx * dx;
  g.B = -g_power * dx * dy;
  g.C = -0.5f * g_power * dy * dy;
  return g;
}

// One pixel's state in the forward pass (front to back).
struct PixelForward {
  float T;                    // transmittance in front of the next Gaussian
  float acc[kMaxChannels];    // sum_i w_i f_i so far
  int last;                   // 1 + position (in the tile's list) of the last Gaussian composited
  bool done;                  // transmittance would have dropped below min_T: stop
};

GSA_HD void forward_begin(PixelForward& st, bool inside) {
  st.T = 1.0f;
  for (int c = 0; c < kMaxChannels; ++c) st.acc[c] = 0.0f;
  st.last = 0;
  st.done = !inside;
}

// Composite the Gaussian at `position` in the tile's list. A pixel stops *after* the Gaussian that
// takes its transmittance below min_T (min_T = 0: never, like the reference), so everything it
// leaves out weighs less than min_T in total. (3DGS stops before that Gaussian, which can leave
// out up to min_T / (1 - 0.99) = 100 min_T.)
GSA_HD void forward_step(PixelForward& st, float px, float py, const float* mean2d, const float* conic, float o,
                         const float* feature, int channels, float min_T, int position) {
  if (st.done) return;
  bool capped;
  const float alpha = pixel_alpha(px - mean2d[0], py - mean2d[1], conic[0], conic[1], conic[2], o, capped);
  if (alpha == 0.0f) return;
  const float w = alpha * st.T;
  for (int c = 0; c < channels; ++c) st.acc[c] += w * feature[c];
  st.T *= 1.0f - alpha;
  st.last = position + 1;
  st.done = st.T < min_T;
}

// One pixel's state in the backward pass, also front to back: with v_i = g . f_i + g_alpha,
// dL/d alpha_i = T_i v_i - (sum_{j>i} w_j v_j) / (1 - alpha_i), and the suffix sum is S - P_i where
// S = sum_j w_j v_j = g . image + g_alpha (1 - T_final) comes from the forward outputs and P_i is
// the running prefix. No division by (1 - alpha) to walk back, so no transmittance underflow.
struct PixelBackward {
  float T;                    // transmittance in front of the next Gaussian
  float prefix;               // P: sum of w_j v_j so far
  float total;                // S
  float g[kMaxChannels];      // dL/d image at this pixel
  float g_alpha;              // dL/d alpha-output at this pixel
  int last;                   // Gaussians at positions >= last were not composited
};

GSA_HD void backward_begin(PixelBackward& st, bool inside, const float* image, const float* v_image, float T_final,
                           float v_alpha, int last, int channels) {
  st.T = 1.0f;
  st.prefix = 0.0f;
  st.total = 0.0f;
  st.g_alpha = inside ? v_alpha : 0.0f;
  st.last = inside ? last : 0;
  for (int c = 0; c < kMaxChannels; ++c) st.g[c] = 0.0f;
  if (!inside) return;
  for (int c = 0; c < channels; ++c) {
    st.g[c] = v_image[c];
    st.total += st.g[c] * image[c];
  }
  st.total += st.g_alpha * (1.0f - T_final);
}

// The gradients of the Gaussian at `position` from this pixel. Returns false (grads untouched)
// when it did not contribute here.
GSA_HD bool backward_step(PixelBackward& st, float px, float py, const float* mean2d, const float* conic, float o,
                          const float* feature, int channels, int position, PairGrad& grad, float* v_feature) {
  if (position >= st.last) return false;
  const float dx = px - mean2d[0], dy = py - mean2d[1];
  bool capped;
  const float alpha = pixel_alpha(dx, dy, conic[0], conic[1], conic[2], o, capped);
  if (alpha == 0.0f) return false;
  const float w = alpha * st.T;
  float v = st.g_alpha;
  for (int c = 0; c < channels; ++c) {
    v += st.g[c] * feature[c];
    v_feature[c] = w * st.g[c];
  }
  st.prefix += w * v;
  const float v_alpha = st.T * v - (st.total - st.prefix) / (1.0f - alpha);
  st.T *= 1.0f - alpha;
  grad = pixel_alpha_vjp(dx, dy, conic[0], conic[1], conic[2], o, alpha, capped, v_alpha);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Per-Gaussian work items shared by the CUDA kernels and the CPU path
// ---------------------------------------------------------------------------------------------

struct ProjectArgs {
  int64_t n;                  // Gaussians
  const float* means;         // [n, 3]
  const float* quats;         // [n, 4]
  const float* scales;        // [n, 3]
  const float* sh;            // [n, sh_stride, 3] or null (colours given directly)
  int sh_degree, sh_stride;
  const int32_t* image_ids;   // [n]: which camera / output image
  const float* viewmats;      // [images, 4, 4]
  const float* Ks;            // [images, 3, 3]
  int images;                 // an image id outside [0, images) culls the Gaussian
  int width, height;
  float eps2d, near_plane, far_plane;
  // forward outputs
  float* means2d;             // [n, 2]
  float* conics;              // [n, 3]
  float* cov2d;               // [n, 3]
  float* depths;              // [n]
  int32_t* radii;             // [n]
  float* colors;              // [n, 3] (when sh)
  // backward inputs / outputs
  const int32_t* radii_in;
  const float *v_means2d, *v_conics, *v_depths, *v_colors;  // v_colors null when no sh
  float *v_means, *v_quats, *v_scales, *v_sh;
};

GSA_HD Camera camera_of(const ProjectArgs& a, int64_t i) {
  const int image = a.image_ids[i];
  return make_camera(a.viewmats + 16 * image, a.Ks + 9 * image, a.width, a.height);
}

GSA_HD void sh_direction(const ProjectArgs& a, const Camera& cam, int64_t i, float dir[3]) {
  float centre[3];
  camera_centre(cam, centre);
  for (int k = 0; k < 3; ++k) dir[k] = a.means[3 * i + k] - centre[k];
}

GSA_HD void project_forward_one(const ProjectArgs& a, int64_t i) {
  if (a.image_ids[i] < 0 || a.image_ids[i] >= a.images) {  // no such camera: culled, never read out of bounds
    for (int k = 0; k < 3; ++k) a.conics[3 * i + k] = a.cov2d[3 * i + k] = 0.0f;
    a.means2d[2 * i] = a.means2d[2 * i + 1] = a.depths[i] = 0.0f;
    a.radii[i] = 0;
    if (a.sh != nullptr)
      for (int k = 0; k < 3; ++k) a.colors[3 * i + k] = 0.0f;
    return;
  }
  const Camera cam = camera_of(a, i);
  Projected pr;
  ProjectionState s;
  project_gaussian(a.means + 3 * i, a.quats + 4 * i, a.scales + 3 * i, cam, a.eps2d, a.near_plane, a.far_plane, pr, s);
  a.means2d[2 * i] = pr.u;
  a.means2d[2 * i + 1] = pr.v;
  a.conics[3 * i] = pr.A;
  a.conics[3 * i + 1] = pr.B;
  a.conics[3 * i + 2] = pr.C;
  a.cov2d[3 * i] = pr.a;
  a.cov2d[3 * i + 1] = pr.b;
  a.cov2d[3 * i + 2] = pr.c;
  a.depths[i] = pr.depth;
  a.radii[i] = static_cast<int32_t>(pr.radius);
  if (a.sh != nullptr) {
    float dir[3];
    sh_direction(a, cam, i, dir);
    sh_color(a.sh_degree, a.sh + 3 * a.sh_stride * i, dir, a.colors + 3 * i);
  }
}

// Culled Gaussians (radius 0) get zero gradients, as in the reference.
GSA_HD void project_backward_one(const ProjectArgs& a, int64_t i) {
  float* v_mean = a.v_means + 3 * i;
  float* v_quat = a.v_quats + 4 * i;
  float* v_scale = a.v_scales + 3 * i;
  if (a.radii_in[i] <= 0) {
    for (int k = 0; k < 3; ++k) v_mean[k] = v_scale[k] = 0.0f;
    for (int k = 0; k < 4; ++k) v_quat[k] = 0.0f;
    if (a.sh != nullptr)
      for (int k = 0; k < 3 * a.sh_stride; ++k) a.v_sh[3 * a.sh_stride * i + k] = 0.0f;
    return;
  }
  const Camera cam = camera_of(a, i);
  Projected pr;
  ProjectionState s;
  project_gaussian(a.means + 3 * i, a.quats + 4 * i, a.scales + 3 * i, cam, a.eps2d, a.near_plane, a.far_plane, pr, s);
  project_gaussian_vjp(a.scales + 3 * i, cam, pr, s, a.v_means2d + 2 * i, a.v_conics + 3 * i, a.v_depths[i], v_mean,
                       v_quat, v_scale);
  if (a.sh != nullptr) {
    float dir[3], v_dir[3];
    sh_direction(a, cam, i, dir);
    float* v_coeffs = a.v_sh + 3 * a.sh_stride * i;
    const int used = (a.sh_degree + 1) * (a.sh_degree + 1);
    for (int k = 3 * used; k < 3 * a.sh_stride; ++k) v_coeffs[k] = 0.0f;
    sh_color_vjp(a.sh_degree, a.sh + 3 * a.sh_stride * i, dir, a.v_colors + 3 * i, v_coeffs, v_dir);
    for (int k = 0; k < 3; ++k) v_mean[k] += v_dir[k];
  }
}

struct IsectArgs {
  int64_t n;
  const float* means2d;       // [n, 2]
  const float* cov2d;         // [n, 3]
  const float* opacities;     // [n]
  const float* depths;        // [n]
  const int32_t* radii;       // [n]
  const int32_t* image_ids;   // [n]
  int width, height, tiles_x, tiles_y;
  int32_t* counts;            // [n] tiles per Gaussian
  const int64_t* starts;      // [n] exclusive prefix sum of counts
  int64_t capacity;           // length of keys / ids: pairs from starts[i] >= capacity are dropped
  int64_t* keys;              // [capacity]
  int32_t* ids;               // [capacity]
};

GSA_HD bool isect_range(const IsectArgs& a, int64_t i, int& tx0, int& tx1, int& ty0, int& ty1) {
  if (a.radii[i] <= 0) return false;
  return tile_range(a.means2d[2 * i], a.means2d[2 * i + 1], a.cov2d[3 * i], a.cov2d[3 * i + 2], a.opacities[i],
                    a.width, a.height, tx0, tx1, ty0, ty1);
}

GSA_HD void isect_count_one(const IsectArgs& a, int64_t i) {
  int tx0, tx1, ty0, ty1;
  a.counts[i] = isect_range(a, i, tx0, tx1, ty0, ty1) ? (tx1 - tx0 + 1) * (ty1 - ty0 + 1) : 0;
}

GSA_HD void isect_write_one(const IsectArgs& a, int64_t i) {
  int tx0, tx1, ty0, ty1;
  if (!isect_range(a, i, tx0, tx1, ty0, ty1)) return;
  int64_t out = a.starts[i];
  // Bounded by the count pass's answer, so a range recomputed differently can never overrun, and
  // by the buffers' capacity (a budgeted frame that needs more pairs than it was given).
  const int64_t wanted = out + a.counts[i];
  const int64_t stop = wanted < a.capacity ? wanted : a.capacity;
  const int64_t image_tiles = static_cast<int64_t>(a.image_ids[i]) * a.tiles_x * a.tiles_y;
  for (int ty = ty0; ty <= ty1; ++ty)
    for (int tx = tx0; tx <= tx1 && out < stop; ++tx, ++out) {
      a.keys[out] = isect_key(image_tiles + static_cast<int64_t>(ty) * a.tiles_x + tx, a.depths[i]);
      a.ids[out] = static_cast<int32_t>(i);
    }
}

struct RasterArgs {
  int channels, width, height, tiles_x, tiles_y;
  const int64_t* tile_offsets;  // [images * tiles + 1]: the list of tile t is [offsets[t], offsets[t+1])
  const int32_t* gauss_ids;     // [pairs], depth-sorted within each tile
  const float* means2d;         // [n, 2]
  const float* conics;          // [n, 3]
  const float* opacities;       // [n]
  const float* features;        // [n, channels]
  float min_T;
  // forward outputs ([images, H, W, ...]) / backward inputs
  float* image;                 // [.., channels]
  float* T_final;               // [..]
  int32_t* last;                // [..]
  // backward
  const float *v_image, *v_alpha;
  float *v_means2d, *v_conics, *v_opacities, *v_features;
};

}  // namespace gsa
