// Precompiled for the targets whose sources use LibTorch's C++ frontend
// (torch::nn modules, <torch/torch.h>): the trainer, the model's tests, moe-convert.
#pragma once
#include <torch/torch.h>
