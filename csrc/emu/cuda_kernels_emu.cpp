// The CUDA kernels of csrc/cuda compiled as host C++ (RWP_EMULATE_CUDA selects simt_emu.h's CUDA).
#include "../cuda/cuda_kernels.cu"
