// CUDA launchers of the rasterizer (raster_kernels.cu). Torch-free, so nvcc compiles the kernels
// without the torch headers; raster_ops.cpp fills the argument structs from tensors.
#pragma once

#ifdef GSA_EMULATE_CUDA
#include "emulated_runtime.h"
#else
#include <cuda_runtime.h>
#endif

#include "raster_math.h"

namespace gsa {

void launch_project_forward(const ProjectArgs& args, cudaStream_t stream);
void launch_project_backward(const ProjectArgs& args, cudaStream_t stream);
void launch_isect_count(const IsectArgs& args, cudaStream_t stream);
void launch_isect_write(const IsectArgs& args, cudaStream_t stream);
// Stable radix sort of (key, id) pairs on the key's bits [0, end_bit) (cub). With temp == nullptr,
// only sets temp_bytes to the scratch size needed.
cudaError_t sort_pairs(const int64_t* keys_in, int64_t* keys_out, const int32_t* ids_in, int32_t* ids_out, int count,
                int end_bit, void* temp, size_t& temp_bytes, cudaStream_t stream);
// images: number of output images (the tile lists of image k follow those of image k - 1).
void launch_raster_forward(const RasterArgs& args, int images, cudaStream_t stream);
void launch_raster_backward(const RasterArgs& args, int images, cudaStream_t stream);

}  // namespace gsa
