// Precompiled for every translation unit that uses LibTorch (see Targets.cmake).
#pragma once
#include <torch/torch.h>
