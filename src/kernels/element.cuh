// Element types of the kernels: conversion to and from float32, in which they all compute, and
// 8-element vector loads (16 bytes for 16-bit types).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "kernels/decode_kernels.h"

namespace aligner::kernels {

__device__ inline float to_float(float x) {
  return x;
}
__device__ inline float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
__device__ inline float to_float(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ inline T from_float(float x);
template <>
__device__ inline float from_float<float>(float x) {
  return x;
}
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);  // round to nearest even, as torch's casts
}
template <>
__device__ inline __half from_float<__half>(float x) {
  return __float2half(x);
}

// Eight consecutive elements as loaded from memory (16-byte aligned for 16-bit types, 32 for float).
template <typename T>
struct Pack8 {
  uint4 u;
};
template <>
struct Pack8<float> {
  float4 a, b;
};

// Whether p (host side: a launcher choosing its kernel) may be read and written as Pack8<T>.
template <typename T>
inline bool aligned8(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack8<T>) == 0;
}

template <typename T>
__device__ inline Pack8<T> load8(const T* p) {
  return {*reinterpret_cast<const uint4*>(p)};
}
template <>
__device__ inline Pack8<float> load8<float>(const float* p) {
  return {reinterpret_cast<const float4*>(p)[0], reinterpret_cast<const float4*>(p)[1]};
}
template <typename T>
__device__ inline Pack8<T> zero8() {
  return {make_uint4(0, 0, 0, 0)};
}
template <>
__device__ inline Pack8<float> zero8<float>() {
  return {make_float4(0, 0, 0, 0), make_float4(0, 0, 0, 0)};
}

__device__ inline void unpack8(const Pack8<__nv_bfloat16>& p, float (&o)[8]) {
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&p.u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ inline void unpack8(const Pack8<__half>& p, float (&o)[8]) {
  const auto* h = reinterpret_cast<const __half2*>(&p.u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ inline void unpack8(const Pack8<float>& p, float (&o)[8]) {
  o[0] = p.a.x, o[1] = p.a.y, o[2] = p.a.z, o[3] = p.a.w;
  o[4] = p.b.x, o[5] = p.b.y, o[6] = p.b.z, o[7] = p.b.w;
}

// Grid-stride launches: kGridThreads per block, and blocks for `work` items up to a cap past which each
// thread takes several (the loops cover any count).
constexpr int kGridThreads = 256;
inline int grid_blocks(int64_t work) {
  return int(std::min<int64_t>((work + kGridThreads - 1) / kGridThreads, 8192));
}

// Calls f with a null pointer of the element type that `dtype` names (f(static_cast<T*>(nullptr))).
template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(static_cast<float*>(nullptr));
      break;
    case DType::kBFloat16:
      f(static_cast<__nv_bfloat16*>(nullptr));
      break;
    case DType::kFloat16:
      f(static_cast<__half*>(nullptr));
      break;
  }
}

}  // namespace aligner::kernels
