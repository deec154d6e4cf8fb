// Stand-in for the CUDA runtime header when our .cu sources are compiled by the host compiler
// against the emulator (csrc/simt). Only what the kernels and their host entry points use.
#pragma once

#include "cuda_runtime_api.h"
#include "simt_device.h"
