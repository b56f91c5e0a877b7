// Precompiled for every translation unit that uses LibTorch (see Targets.cmake):
// tensors, ATen's operators and autograd functions. The C++ frontend
// (torch/nn, <torch/torch.h>) is in torch_frontend_pch.h, for the targets that use it.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
